//! Where a measurement comes from, so runs from different machines, builds and workloads can be
//! told apart and compared: the machine (CPU model, cores, the SIMD instruction set
//! libjpeg-turbo picks, kernel, load), the build (version, git commit) and the workload (source
//! size, bytes, chroma subsampling, baseline or progressive, crops, quality).
//!
//! Everything here is read once per run from `/proc`, `uname` and the source's header; nothing
//! fails — what cannot be read is `"unknown"` (or 0), because a record without a machine name
//! is still a record.

use serde::{Deserialize, Serialize};

use crate::engine::{self, Format};

/// The machine a run measured.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Machine {
    /// CPU model as the kernel reports it, with family/model/stepping on x86 (a virtual machine's
    /// model name is often generic).
    pub cpu_model: String,
    /// CPU cores this process may use.
    pub cores: u32,
    /// The SIMD instruction set libjpeg-turbo uses here: `AVX2`, `SSE2`, `NEON` or `none`.
    pub simd: String,
    /// Kernel name and release, e.g. `Linux 6.1.0-18-amd64`.
    pub kernel: String,
}

impl Machine {
    /// This machine.
    pub fn this() -> Machine {
        Machine {
            cpu_model: cpu_model(),
            cores: std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1),
            simd: jpeg_simd().into(),
            kernel: kernel(),
        }
    }

    /// One line for tables and pictures: `Intel(R) Xeon(R) …, 2 cores, AVX2, Linux 6.1`.
    pub fn describe(&self) -> String {
        if self.cpu_model.is_empty() {
            return "unknown machine".into();
        }
        format!("{}, {} cores, {}, {}", self.cpu_model, self.cores, self.simd, self.kernel)
    }
}

/// The build that ran the sweep.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Build {
    /// cropfleet's version (Cargo.toml).
    pub version: String,
    /// Git commit the binary was built from, `"unknown"` when built without `.git` (e.g. in a
    /// Docker build that did not pass `CROPFLEET_GIT_COMMIT`).
    pub git_commit: String,
}

/// The workload of a run: one source image and its crop list, repeated.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Workload {
    /// The source as given (credentials removed).
    pub image: String,
    /// `jpeg`, `png`, `webp`, or `unknown` when the source could not be read here.
    pub format: String,
    pub width: u32,
    pub height: u32,
    pub bytes: u64,
    /// `4:2:0`, `4:2:2`, `4:4:4`, `4:4:0`, `4:1:1`, `4:4:1`, `gray`, `other`; `n/a` for PNG/WebP.
    pub subsampling: String,
    /// JPEG coding process: `baseline`, `extended`, `progressive`, `lossless`, `arithmetic`; `n/a`
    /// for PNG/WebP.
    pub process: String,
    /// Crops per task.
    pub crops: u32,
    /// JPEG quality of the crops.
    pub quality: u8,
}

impl Workload {
    /// Describe a source from its bytes (header only; nothing is decoded).
    pub fn describe(image: &str, bytes: &[u8], crops: usize, quality: u8) -> Workload {
        let mut w = Workload {
            image: crate::secret::redact(image),
            format: "unknown".into(),
            bytes: bytes.len() as u64,
            subsampling: "n/a".into(),
            process: "n/a".into(),
            crops: crops as u32,
            quality,
            ..Default::default()
        };
        if let Ok(info) = engine::probe(bytes, u64::MAX) {
            (w.width, w.height) = info.display_size();
            w.format = match info.format {
                Format::Jpeg => "jpeg",
                Format::Png => "png",
                Format::WebP => "webp",
            }
            .into();
        }
        if w.format == "jpeg" {
            if let Some(frame) = crate::lossless::frame_header(bytes) {
                w.process = match frame.marker {
                    0xC0 => "baseline",
                    0xC1 => "extended",
                    0xC2 => "progressive",
                    0xC3 => "lossless",
                    _ => "arithmetic",
                }
                .into();
            }
            w.subsampling = turbojpeg::read_header(bytes)
                .map(|h| {
                    use turbojpeg::Subsamp::*;
                    match h.subsamp {
                        Sub2x2 => "4:2:0",
                        Sub2x1 => "4:2:2",
                        None => "4:4:4",
                        Sub1x2 => "4:4:0",
                        Sub4x1 => "4:1:1",
                        Sub1x4 => "4:4:1",
                        Gray => "gray",
                        _ => "other",
                    }
                })
                .unwrap_or("other")
                .into();
        }
        w
    }

    /// One line: `4000x3000 jpeg baseline 4:2:0, 1.70 MB, 50 crops, q85`.
    pub fn describe_line(&self) -> String {
        if self.width == 0 {
            return format!("{} (not readable here), {} crops, q{}", self.image, self.crops, self.quality);
        }
        let kind = match self.format.as_str() {
            "jpeg" => format!("jpeg {} {}", self.process, self.subsampling),
            other => other.to_string(),
        };
        format!(
            "{}x{} {kind}, {:.2} MB, {} crops, q{}",
            self.width,
            self.height,
            self.bytes as f64 / 1e6,
            self.crops,
            self.quality
        )
    }
}

/// The 1-minute load average, when the system reports one.
pub fn load_average() -> Option<f64> {
    let mut l = [0f64; 3];
    // SAFETY: getloadavg writes at most 3 doubles into the array we pass.
    (unsafe { libc::getloadavg(l.as_mut_ptr(), 3) } >= 1).then_some(l[0])
}

fn cpu_model() -> String {
    let text = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find(|l| l.split(':').next().is_some_and(|k| k.trim() == name))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .filter(|v| !v.is_empty())
    };
    let model = field("model name").or_else(|| field("Hardware")).or_else(|| field("cpu model"));
    match (model, field("cpu family"), field("model"), field("stepping")) {
        (Some(m), Some(f), Some(n), Some(s)) => format!("{m} (family {f} model {n} stepping {s})"),
        (Some(m), ..) => m,
        // ARM kernels name the implementer and part instead of a model.
        (None, ..) => match (field("CPU implementer"), field("CPU part")) {
            (Some(i), Some(p)) => format!("{} CPU implementer {i} part {p}", std::env::consts::ARCH),
            _ => "unknown".into(),
        },
    }
}

fn kernel() -> String {
    // SAFETY: uname fills the zeroed struct; its fields are NUL-terminated C strings.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    if unsafe { libc::uname(&mut u) } != 0 {
        return "unknown".into();
    }
    let s = |f: &[libc::c_char]| {
        let bytes: Vec<u8> = f.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
        String::from_utf8_lossy(&bytes).into_owned()
    };
    format!("{} {}", s(&u.sysname), s(&u.release))
}

#[cfg(target_arch = "x86_64")]
extern "C" {
    /// libjpeg-turbo's own CPU probe (simd/x86_64/jsimdcpu.asm), linked in by turbojpeg-sys:
    /// a bit set of JSIMD_* flags, the same value its SIMD dispatch starts from. It is in the
    /// static library this workspace builds (turbojpeg-sys's `cmake` feature); a shared
    /// libturbojpeg would export only the `tj*` API.
    fn jpeg_simd_cpu_support() -> libc::c_uint;
}

/// The SIMD instruction set libjpeg-turbo's dispatch picks on this machine: its own CPU probe,
/// then the `JSIMD_FORCE*` environment overrides applied as `simd/x86_64/jsimd.c` does.
pub fn jpeg_simd() -> &'static str {
    let forced = |name: &str| std::env::var(name).is_ok_and(|v| v == "1");
    #[cfg(target_arch = "x86_64")]
    {
        const SSE2: u32 = 0x08;
        const AVX2: u32 = 0x80;
        // SAFETY: a leaf function with no arguments that executes CPUID/XGETBV.
        let mut flags = unsafe { jpeg_simd_cpu_support() } as u32;
        if forced("JSIMD_FORCESSE2") {
            flags &= SSE2;
        }
        if forced("JSIMD_FORCEAVX2") {
            flags &= AVX2;
        }
        if forced("JSIMD_FORCENONE") {
            flags = 0;
        }
        if flags & AVX2 != 0 {
            "AVX2"
        } else if flags & SSE2 != 0 {
            "SSE2"
        } else {
            "none"
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        // Neon is part of AArch64; libjpeg-turbo uses it unless told not to.
        if forced("JSIMD_FORCENONE") {
            "none"
        } else {
            "NEON"
        }
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        let _ = forced;
        "unknown"
    }
}

/// How many different machines `machines` holds (records of one sweep share one).
pub fn distinct_machines<'a>(machines: impl IntoIterator<Item = &'a Machine>) -> Vec<&'a Machine> {
    let mut seen: Vec<&Machine> = Vec::new();
    for m in machines {
        if !m.cpu_model.is_empty() && !seen.contains(&m) {
            seen.push(m);
        }
    }
    seen
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_machine_is_named() {
        let m = Machine::this();
        assert!(m.cores >= 1);
        assert!(m.kernel.starts_with("Linux "), "{m:?}");
        assert_ne!(m.cpu_model, "");
        // turbojpeg-sys is built with require-simd: an x86_64 or aarch64 build always has some.
        if cfg!(any(target_arch = "x86_64", target_arch = "aarch64")) {
            assert_ne!(m.simd, "none", "{m:?}");
        }
        assert!(m.describe().contains(&m.simd));
    }

    #[test]
    fn workload_of_baseline_and_progressive_jpeg_and_png() {
        let rgb = crate::sample::photo(64, 48, 1);
        let base = crate::sample::encode_jpeg(&rgb, 64, 48, 90, false);
        let w = Workload::describe("amqp://u:pw@h/x", &base, 50, 85);
        assert_eq!(
            (w.format.as_str(), w.width, w.height, w.subsampling.as_str(), w.process.as_str()),
            ("jpeg", 64, 48, "4:2:0", "baseline")
        );
        assert_eq!((w.bytes, w.crops, w.quality), (base.len() as u64, 50, 85));
        assert!(!w.image.contains("pw"), "{}", w.image);
        assert!(w.describe_line().starts_with("64x48 jpeg baseline 4:2:0"), "{}", w.describe_line());
        let prog = crate::sample::encode_jpeg(&rgb, 64, 48, 90, true);
        assert_eq!(Workload::describe("p.jpg", &prog, 1, 85).process, "progressive");
        let png_bytes = crate::sample::encode_png(&rgb, 64, 48);
        let png = Workload::describe("x.png", &png_bytes, 1, 85);
        assert_eq!((png.format.as_str(), png.width, png.process.as_str()), ("png", 64, "n/a"));
        let junk = Workload::describe("x", b"nope", 3, 85);
        assert_eq!((junk.format.as_str(), junk.width), ("unknown", 0));
        assert!(junk.describe_line().contains("not readable here"));
    }

    #[test]
    fn machines_are_told_apart() {
        let a = Machine { cpu_model: "A".into(), cores: 2, simd: "AVX2".into(), kernel: "Linux 6".into() };
        let b = Machine { cores: 4, ..a.clone() };
        assert_eq!(distinct_machines([&a, &a, &Machine::default()]).len(), 1);
        assert_eq!(distinct_machines([&a, &b, &a]).len(), 2);
    }

    #[test]
    fn load_average_is_read() {
        assert!(load_average().is_some_and(|l| l >= 0.0));
    }
}
