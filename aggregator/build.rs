//! Stamps the git commit of the build into the binary as `CROPFLEET_GIT_COMMIT`, for the
//! provenance of every run record. Order: the `CROPFLEET_GIT_COMMIT` environment variable at
//! build time (a Docker build has no `.git`; pass it as a build argument), else `git rev-parse
//! HEAD`, else `unknown`. Reruns when HEAD or the branch it points to moves, so a commit without
//! code changes still updates the stamp.

use std::path::{Path, PathBuf};
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).current_dir(env!("CARGO_MANIFEST_DIR")).output().ok()?;
    let s = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (out.status.success() && !s.is_empty()).then_some(s)
}

fn main() {
    println!("cargo:rerun-if-env-changed=CROPFLEET_GIT_COMMIT");
    let commit = match std::env::var("CROPFLEET_GIT_COMMIT") {
        Ok(c) if !c.trim().is_empty() => c.trim().to_string(),
        _ => {
            // Watch the files that move when HEAD does (a worktree's HEAD lives in its own git
            // dir, branches in the common one).
            let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
            let abs = |p: String| {
                let p = PathBuf::from(p);
                if p.is_absolute() {
                    p
                } else {
                    manifest.join(p)
                }
            };
            if let (Some(dir), Some(common)) =
                (git(&["rev-parse", "--git-dir"]), git(&["rev-parse", "--git-common-dir"]))
            {
                let (dir, common) = (abs(dir), abs(common));
                let branch = git(&["symbolic-ref", "-q", "HEAD"]).map(|b| common.join(b));
                // Only files that exist: cargo reruns a script whose watched file is missing
                // on every build.
                for f in [Some(dir.join("HEAD")), Some(common.join("packed-refs")), branch].into_iter().flatten() {
                    if f.exists() {
                        println!("cargo:rerun-if-changed={}", f.display());
                    }
                }
            }
            git(&["rev-parse", "HEAD"]).unwrap_or_else(|| "unknown".into())
        }
    };
    println!("cargo:rustc-env=CROPFLEET_GIT_COMMIT={commit}");
}
