//! Lossless crop mode: cut every crop of a task out of a JPEG in the DCT domain, in one pass.
//!
//! Two ways, same coefficients: for sequential Huffman sources with no rotation to apply,
//! `bitcopy` indexes the scan once and writes each crop by copying its blocks' entropy-coded
//! bits (16 ms for the sample's 50 crops); every other source goes to one `tj3Transform` call
//! (30 ms), described below. [`crop_all_with`] can force the latter.
//!
//! libjpeg-turbo's `tj3Transform` reads the source's DCT coefficients once and writes any
//! number of cropped JPEGs from them: no IDCT, no colour conversion, no re-quantisation, so a
//! crop carries exactly the source's coefficients for its blocks (its decoded luma equals the
//! source's, bit for bit). [`crop_all`] hands all boxes of a task to **one** call; the
//! `turbojpeg` crate's safe `Transformer::transform` passes one transform per call and would
//! re-read the whole source for every crop (~0.98 s instead of ~31 ms for 50 crops of 12 MP;
//! `cargo bench -p cropfleet --bench lossless`).
//!
//! Choices:
//! - **Snapping.** A cropped JPEG must start on the iMCU grid (8 or 16 px, from the source's
//!   sampling factors; 32 px for 4:1:1 / 4:4:1). Each box is snapped *outward*: left and top
//!   floored to the grid, right and bottom kept, so the written box contains the requested one
//!   and differs from it only by at most one iMCU minus one pixel on the left and top. The right
//!   and bottom edges need no alignment (a partial iMCU at the edge of an output is legal).
//!   [`LosslessCrop::snapped`] is the box actually written; the worker reports it.
//! - **Orientation.** Crop boxes refer to the image as displayed (EXIF orientation applied).
//!   A source with orientation 2–8 is rotated/flipped by the same call (`tj3Transform` combines
//!   the matching transform with the crop), as long as that transform is *perfect* for the image
//!   — i.e. the edges it moves to the top/left are whole iMCUs. Otherwise libjpeg-turbo would
//!   leave the partial iMCUs in place and shift the rest of the picture by a few pixels, so
//!   [`can_transform`] refuses such sources with a reason and the worker decodes instead.
//!   `TJXOPT_PERFECT` is always set as a safety net: if the up-front check were ever wrong, the
//!   call fails instead of writing shifted pixels. A rotated/flipped crop carries the source's
//!   coefficients moved and sign-flipped, still without loss; its decoded pixels equal those of
//!   the whole image rotated losslessly, and differ by at most ±1 from "decode, then rotate the
//!   pixels", because the integer IDCT rounds a transposed or mirrored block differently.
//! - **Metadata.** Outputs keep the source's ICC profile (APP2: the coefficients are in the
//!   source's colour space, so the profile still describes them) and drop everything else
//!   (`TJPARAM_SAVEMARKERS = 4`). EXIF has to go: its orientation tag would rotate an already
//!   upright crop a second time, and 50 copies of a camera's EXIF thumbnail and GPS position would
//!   bloat and leak. This matches the decode path, whose crops carry no EXIF either.
//! - **Output coding.** Baseline Huffman with standard tables, whatever the source used
//!   (progressive and arithmetic-coded sources are read fine): the same coding as the decode
//!   path's crops, fastest to write and to decode. (Reading the source's header sets the handle's
//!   progressive/arithmetic parameters, which `tj3Transform` would copy to every output; they
//!   are reset before each call.) Huffman optimisation (`TJXOPT_OPTIMIZE`) is off: on the sample
//!   it saves 7% of the bytes (1.26 → 1.17 MB for 50 crops) but takes 57 instead of 31 ms.
//! - **Buffers.** libjpeg-turbo allocates each output (`dstBufs[i] = NULL`) and grows it by
//!   doubling from 4 KiB; every output is copied into a `Vec` of the exact size and released
//!   with `tj3Free` right away, on success and on error. Passing our own buffers while
//!   letting the library grow them is unsafe with several transforms per call: its destination
//!   manager frees a stale `newbuffer` left over from an earlier transform. The other safe way,
//!   `TJPARAM_NOREALLOC` with per-thread buffers of `tj3TransformBufSize` bytes (~0.5 MB per
//!   crop slot, kept per thread), measured no faster on the sample: 31.8 vs 32.4 ms and
//!   30.6 vs 31.4 ms (load 1.0–1.6), 66.6 vs 66.1 ms without `keep_allocations_resident`.
//! - **Which sources.** 8-bit DCT JPEGs (baseline, extended, progressive; Huffman or arithmetic)
//!   in YCbCr or grayscale with any subsampling TurboJPEG names (4:4:4, 4:2:2, 4:2:0, 4:4:0,
//!   4:1:1, 4:4:1, gray). Refused with a reason: non-JPEG sources, lossless JPEG (no DCT),
//!   12/16-bit, CMYK/YCCK/RGB-coded JPEGs (the decode path turns them into ordinary YCbCr
//!   crops), unusual sampling factors, and imperfect orientations (above).
//! - **Limits.** The transform holds the whole coefficient image (3 bytes per pixel for 4:2:0:
//!   36 MB for 12 MP) plus a coefficient copy of every crop (~24 MB for the sample's 50);
//!   callers enforce the pixel limit first with [`engine::probe`], as the
//!   worker does for the decode path.
//! - **Allocator.** libjpeg-turbo mallocs and frees those arrays on every call; with glibc's
//!   default thresholds they go back to the OS each time and the call takes twice as long
//!   (66 vs 31 ms on the sample): processes that use this module must call
//!   [`keep_allocations_resident`](crate::util::keep_allocations_resident) at start-up (the
//!   worker does).
//!
//! One TurboJPEG transform handle is kept per thread and reused (replaced after an error).

mod bitcopy;

use std::cell::RefCell;
use std::ffi::CStr;

use libc::c_int;
use turbojpeg_sys as sys;

use crate::crops::CropBox;
use crate::engine::{self, EngineError, Format};
use crate::exif;

/// One crop cut losslessly: a complete JPEG file and the box it actually covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LosslessCrop {
    /// The cropped JPEG (baseline, Huffman-coded, the source's ICC profile if it had one).
    pub jpeg: Vec<u8>,
    /// The box written, in displayed-image pixels: the requested box with its left and top
    /// edges moved out to the iMCU grid. It contains the requested box; its size is the
    /// crop's size.
    pub snapped: CropBox,
}

/// What the header says about a JPEG that can be cropped losslessly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Width of the image as displayed (after EXIF orientation): the frame boxes refer to.
    pub width: u32,
    /// Height of the image as displayed.
    pub height: u32,
    /// iMCU width in displayed pixels: every crop's left edge is a multiple of it.
    pub mcu_width: u32,
    /// iMCU height in displayed pixels: every crop's top edge is a multiple of it.
    pub mcu_height: u32,
    /// EXIF orientation of the source (1 = upright); 2–8 are applied by the transform.
    pub orientation: u8,
}

/// Read the header and say whether [`crop_all`] can handle this source. `Err` carries the
/// reason, worded for a result event ("… — falling back to decode" is the caller's to add).
pub fn can_transform(jpeg: &[u8]) -> Result<(), String> {
    inspect(jpeg).map(|_| ())
}

/// As [`can_transform`], returning the displayed size and the iMCU grid the boxes snap to.
pub fn inspect(jpeg: &[u8]) -> Result<Layout, String> {
    with_handle(|h| plan(h, jpeg).map(|p| p.layout))
}

/// Move a box's left and top edges out to the iMCU grid of `layout`, keeping its right and
/// bottom edges (clamped to the image). The box must have passed [`CropBox::check`].
pub fn snap(b: &CropBox, layout: &Layout) -> CropBox {
    let (mw, mh) = (layout.mcu_width.max(1) as i64, layout.mcu_height.max(1) as i64);
    let x = b.x - b.x.rem_euclid(mw);
    let y = b.y - b.y.rem_euclid(mh);
    let right = b.x.saturating_add(b.w).min(layout.width as i64);
    let bottom = b.y.saturating_add(b.h).min(layout.height as i64);
    CropBox { x, y, w: right - x, h: bottom - y }
}

/// Cut every box out of `jpeg` losslessly, in one `tj3Transform` call, returning the crops in
/// the order of `boxes`.
///
/// Boxes are checked against the displayed size ([`EngineError::BadBox`] names the first bad
/// one). A source that [`can_transform`] refuses gives [`EngineError::Decode`] with the reason, so
/// call that first to choose between this and the decode path. A corrupt or truncated JPEG gives
/// [`EngineError::Decode`] (libjpeg-turbo's warnings count as errors, as in the decode path).
pub fn crop_all(jpeg: &[u8], boxes: &[CropBox]) -> Result<Vec<LosslessCrop>, EngineError> {
    crop_all_with(jpeg, boxes, Method::Fastest)
}

/// How [`crop_all_with`] cuts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// Copy the entropy-coded bits of every block where the source allows it (sequential
    /// Huffman, one scan, no rotation), else one `tj3Transform` call. What [`crop_all`] does.
    Fastest,
    /// Always one `tj3Transform` call (for comparisons and benchmarks).
    Tj3Transform,
}

/// [`crop_all`] with the method chosen: both write crops with the same coefficients, so they
/// decode to the same pixels.
pub fn crop_all_with(jpeg: &[u8], boxes: &[CropBox], method: Method) -> Result<Vec<LosslessCrop>, EngineError> {
    let res = with_handle(|h| {
        Ok(match plan(h, jpeg) {
            Ok(plan) => transform(h, jpeg, &plan, boxes, method),
            Err(reason) => Err(EngineError::Decode(format!("cannot crop losslessly: {reason}"))),
        })
    });
    res.unwrap_or_else(|e| Err(EngineError::Internal(e)))
}

// ---------------------------------------------------------------------------------------------
// The plan: header checks, grid and orientation

/// A source that can be transformed, and how.
#[derive(Debug, Clone, Copy)]
struct Plan {
    layout: Layout,
    /// The `TJXOP_*` that turns the stored image upright.
    op: c_int,
}

/// The transform that displays a stored image the way its EXIF orientation says, whether it
/// swaps the axes, and its name for messages.
fn orientation_op(orientation: u8) -> (sys::TJXOP, bool, &'static str) {
    match orientation {
        2 => (sys::TJXOP_TJXOP_HFLIP, false, "a horizontal flip"),
        3 => (sys::TJXOP_TJXOP_ROT180, false, "a 180° rotation"),
        4 => (sys::TJXOP_TJXOP_VFLIP, false, "a vertical flip"),
        5 => (sys::TJXOP_TJXOP_TRANSPOSE, true, "a transpose"),
        6 => (sys::TJXOP_TJXOP_ROT90, true, "a 90° clockwise rotation"),
        7 => (sys::TJXOP_TJXOP_TRANSVERSE, true, "a transverse"),
        8 => (sys::TJXOP_TJXOP_ROT270, true, "a 90° counter-clockwise rotation"),
        _ => (sys::TJXOP_TJXOP_NONE, false, "no transform"),
    }
}

/// Which edges of the stored image keep `op` from being perfect (libjpeg's
/// `jtransform_perfect_transform`): the ones it moves to the top or left must be whole iMCUs.
/// Empty when the transform is perfect, else words for a message.
fn imperfect_edges(op: sys::TJXOP, right_whole: bool, bottom_whole: bool) -> &'static str {
    let (need_right, need_bottom) = match op {
        sys::TJXOP_TJXOP_HFLIP | sys::TJXOP_TJXOP_ROT270 => (true, false),
        sys::TJXOP_TJXOP_VFLIP | sys::TJXOP_TJXOP_ROT90 => (false, true),
        sys::TJXOP_TJXOP_TRANSVERSE | sys::TJXOP_TJXOP_ROT180 => (true, true),
        _ => (false, false),
    };
    match (need_right && !right_whole, need_bottom && !bottom_whole) {
        (true, true) => "width and height are",
        (true, false) => "width is",
        (false, true) => "height is",
        (false, false) => "",
    }
}

/// What the frame header (SOFn) says; read here because TurboJPEG does not expose sampling
/// factors, and does not reset its header fields for a tables-only stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Frame {
    /// The SOFn marker's second byte: 0xC0 baseline, 0xC1 extended, 0xC2 progressive, …
    pub(crate) marker: u8,
    pub(crate) width: u32,
    pub(crate) height: u32,
    pub(crate) components: u8,
    /// Largest horizontal and vertical sampling factors.
    pub(crate) hmax: u8,
    pub(crate) vmax: u8,
}

/// The frame header, or `None` when no well-formed SOF marker precedes the first scan.
pub(crate) fn frame_header(jpeg: &[u8]) -> Option<Frame> {
    let is_sof = |m: u8| (0xC0..=0xCF).contains(&m) && !matches!(m, 0xC4 | 0xC8 | 0xCC);
    let (marker, seg) = exif::header_segments(jpeg).find(|(marker, _)| is_sof(*marker))?;
    // precision, height(2), width(2), count, then (id, h<<4|v, table) per component.
    let be16 = |o: usize| seg.get(o..o + 2).map(|b| u16::from_be_bytes([b[0], b[1]]) as u32);
    let (height, width, count) = (be16(1)?, be16(3)?, *seg.get(5)?);
    let comps = seg.get(6..6 + 3 * count as usize)?;
    let (mut h, mut v) = (1u8, 1u8);
    for c in comps.chunks_exact(3) {
        h = h.max(c[1] >> 4);
        v = v.max(c[1] & 0x0F);
    }
    Some(Frame { marker, width, height, components: count, hmax: h, vmax: v })
}

fn plan(h: &mut Handle, jpeg: &[u8]) -> Result<Plan, String> {
    match engine::sniff(jpeg) {
        Ok(Format::Jpeg) => {}
        Ok(Format::Png) => return Err("the source is a PNG, not a JPEG".into()),
        Ok(Format::WebP) => return Err("the source is a WebP, not a JPEG".into()),
        Err(EngineError::Decode(m)) => return Err(m),
        Err(e) => return Err(e.to_string()),
    }
    let frame = frame_header(jpeg).ok_or("unreadable JPEG header: no frame (SOF) marker before the first scan")?;
    h.read_header(jpeg).map_err(|e| format!("unreadable JPEG header: {e}"))?;
    if h.get(sys::TJPARAM_TJPARAM_LOSSLESS) == 1 {
        return Err("lossless JPEG (SOF3): it has no DCT coefficients to crop".into());
    }
    let precision = h.get(sys::TJPARAM_TJPARAM_PRECISION);
    if precision != 8 {
        return Err(format!("{precision}-bit JPEG: lossless crops handle 8-bit samples only"));
    }
    let colorspace = h.get(sys::TJPARAM_TJPARAM_COLORSPACE);
    match colorspace as sys::TJCS {
        sys::TJCS_TJCS_YCbCr | sys::TJCS_TJCS_GRAY => {}
        sys::TJCS_TJCS_CMYK | sys::TJCS_TJCS_YCCK => {
            return Err("CMYK JPEG: its crops would stay CMYK (the decode path converts to RGB)".into())
        }
        sys::TJCS_TJCS_RGB => {
            return Err("RGB-coded JPEG: its crops would stay RGB-coded (the decode path writes YCbCr)".into())
        }
        _ => return Err(format!("JPEG in an unknown colourspace (TurboJPEG says {colorspace})")),
    }
    let subsamp = h.get(sys::TJPARAM_TJPARAM_SUBSAMP);
    if !(0..sys::TJ_NUMSAMP as c_int).contains(&subsamp) {
        return Err("JPEG with unusual chroma sampling factors, which libjpeg-turbo cannot crop losslessly".into());
    }
    let (width, height) = (h.get(sys::TJPARAM_TJPARAM_JPEGWIDTH), h.get(sys::TJPARAM_TJPARAM_JPEGHEIGHT));
    let (width, height) = (u32::try_from(width).unwrap_or(0), u32::try_from(height).unwrap_or(0));
    if width == 0 || height == 0 || (width, height) != (frame.width, frame.height) {
        return Err(format!("unreadable JPEG header: size {width}x{height}, frame {}x{}", frame.width, frame.height));
    }
    // The iMCU size as libjpeg's transform code computes it: 8 px for a single component,
    // else the largest sampling factors × 8. (TurboJPEG's own iMCU table, indexed by the
    // subsampling it reports, can be smaller for non-standard factors such as 4:4:4 written
    // as 2x2 for every component; offsets on the true grid satisfy both.)
    let (stored_mw, stored_mh) =
        if frame.components == 1 { (8u32, 8u32) } else { (8 * frame.hmax.max(1) as u32, 8 * frame.vmax.max(1) as u32) };
    let orientation = exif::jpeg_orientation(jpeg).unwrap_or(1);
    let (op, transposed, op_name) = orientation_op(orientation);
    let edges = imperfect_edges(op, width % stored_mw == 0, height % stored_mh == 0);
    if !edges.is_empty() {
        return Err(format!(
            "EXIF orientation {orientation} needs {op_name}, which is not lossless for this image: its {edges} \
             not a whole number of {stored_mw}x{stored_mh} iMCUs ({width}x{height})"
        ));
    }
    let layout = if transposed {
        Layout { width: height, height: width, mcu_width: stored_mh, mcu_height: stored_mw, orientation }
    } else {
        Layout { width, height, mcu_width: stored_mw, mcu_height: stored_mh, orientation }
    };
    Ok(Plan { layout, op: op as c_int })
}

// ---------------------------------------------------------------------------------------------
// The transform

fn transform(
    h: &mut Handle,
    jpeg: &[u8],
    plan: &Plan,
    boxes: &[CropBox],
    method: Method,
) -> Result<Vec<LosslessCrop>, EngineError> {
    let layout = &plan.layout;
    let mut snapped = Vec::with_capacity(boxes.len());
    for (i, b) in boxes.iter().enumerate() {
        b.check(i, layout.width, layout.height)?;
        snapped.push(snap(b, layout));
    }
    if boxes.is_empty() {
        return Ok(Vec::new());
    }
    if method == Method::Fastest && plan.op == sys::TJXOP_TJXOP_NONE as c_int {
        match bitcopy::crop_all(jpeg, &snapped) {
            Ok(jpegs) => {
                let crops = jpegs.into_iter().zip(snapped).map(|(jpeg, snapped)| LosslessCrop { jpeg, snapped });
                return Ok(crops.collect());
            }
            Err(reason) => tracing::debug!(%reason, "bit-copy crops declined the source; using tj3Transform"),
        }
    }
    let n = c_int::try_from(boxes.len()).map_err(|_| EngineError::InvalidCrops(format!("{} boxes", boxes.len())))?;
    // Boxes fit in the image (checked above), whose sides fit in a c_int (TurboJPEG's).
    let transforms: Vec<sys::tjtransform> = snapped
        .iter()
        .map(|s| sys::tjtransform {
            r: sys::tjregion { x: s.x as c_int, y: s.y as c_int, w: s.w as c_int, h: s.h as c_int },
            op: plan.op,
            options: (sys::TJXOPT_CROP | sys::TJXOPT_PERFECT) as c_int,
            data: std::ptr::null_mut(),
            customFilter: None,
        })
        .collect();
    let decode_err = |h: &mut Handle| EngineError::Decode(format!("lossless crop failed: {}", h.error()));

    // Reading the header set the handle's progressive/arithmetic parameters from the source,
    // and tj3Transform would write every crop that way; crops are baseline Huffman (module docs).
    h.set(sys::TJPARAM_TJPARAM_PROGRESSIVE, 0).map_err(EngineError::Internal)?;
    h.set(sys::TJPARAM_TJPARAM_ARITHMETIC, 0).map_err(EngineError::Internal)?;
    // libjpeg-turbo allocates every output: with our own buffers *and* reallocation allowed, its
    // destination manager can free a buffer of an earlier transform when it grows one.
    h.set(sys::TJPARAM_TJPARAM_NOREALLOC, 0).map_err(EngineError::Internal)?;
    let mut out = Outputs::new(boxes.len());
    // SAFETY: `jpeg` is readable for its length; `ptrs`/`sizes`/`transforms` hold `n` entries;
    // every `ptrs[i]` is NULL, so the library allocates it (`Outputs` frees it).
    let rc = unsafe {
        sys::tj3Transform(
            h.ptr,
            jpeg.as_ptr(),
            jpeg.len() as sys::size_t,
            n,
            out.ptrs.as_mut_ptr(),
            out.sizes.as_mut_ptr(),
            transforms.as_ptr(),
        )
    };
    if rc != 0 {
        let e = decode_err(h);
        h.broken = true;
        return Err(e);
    }
    let mut crops = Vec::with_capacity(boxes.len());
    for (i, s) in snapped.into_iter().enumerate() {
        let (ptr, len) = (out.ptrs[i], out.sizes[i] as usize);
        if ptr.is_null() || len == 0 {
            return Err(EngineError::Internal(format!("lossless crop #{i}: libjpeg-turbo wrote no output")));
        }
        // SAFETY: after a successful call `ptrs[i]` holds `sizes[i]` bytes of JPEG.
        let jpeg = unsafe { std::slice::from_raw_parts(ptr, len) }.to_vec();
        crops.push(LosslessCrop { jpeg, snapped: s });
    }
    Ok(crops)
}

/// The output pointers and sizes of one `tj3Transform` call; frees whatever the library
/// allocated when dropped, whether the call succeeded, failed half-way or we panicked.
struct Outputs {
    ptrs: Vec<*mut u8>,
    sizes: Vec<sys::size_t>,
}

impl Outputs {
    fn new(n: usize) -> Outputs {
        Outputs { ptrs: vec![std::ptr::null_mut(); n], sizes: vec![0; n] }
    }
}

impl Drop for Outputs {
    fn drop(&mut self) {
        for p in self.ptrs.iter().filter(|p| !p.is_null()) {
            // SAFETY: non-null entries were allocated by libjpeg-turbo for this call (on error
            // it still hands back the buffer it was writing), and are freed once.
            unsafe { sys::tj3Free(p.cast()) };
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The per-thread handle

/// A TurboJPEG instance initialised for lossless transformation.
struct Handle {
    ptr: sys::tjhandle,
    /// Set after a failed call; the handle is then replaced rather than reused.
    broken: bool,
}

impl Handle {
    fn new() -> Result<Handle, String> {
        // SAFETY: tj3Init has no preconditions; a NULL result is checked.
        let ptr = unsafe { sys::tj3Init(sys::TJINIT_TJINIT_TRANSFORM as c_int) };
        if ptr.is_null() {
            // SAFETY: with a NULL handle, tj3GetErrorStr returns the global error string.
            let msg = unsafe { CStr::from_ptr(sys::tj3GetErrorStr(std::ptr::null_mut())) };
            return Err(format!("cannot create a TurboJPEG transform handle: {}", msg.to_string_lossy()));
        }
        let mut h = Handle { ptr, broken: false };
        // Copy only ICC profiles (APP2) into the crops; see the module docs.
        h.set(sys::TJPARAM_TJPARAM_SAVEMARKERS, 4)?;
        Ok(h)
    }

    fn error(&mut self) -> String {
        // SAFETY: the handle is valid; the string lives in the handle until the next call.
        let msg = unsafe { CStr::from_ptr(sys::tj3GetErrorStr(self.ptr)) };
        msg.to_string_lossy().replace('\n', " ")
    }

    fn set(&mut self, param: sys::TJPARAM, value: c_int) -> Result<(), String> {
        // SAFETY: the handle is valid.
        if unsafe { sys::tj3Set(self.ptr, param as c_int, value) } != 0 {
            return Err(self.error());
        }
        Ok(())
    }

    fn get(&mut self, param: sys::TJPARAM) -> c_int {
        // SAFETY: the handle is valid.
        unsafe { sys::tj3Get(self.ptr, param as c_int) }
    }

    fn read_header(&mut self, jpeg: &[u8]) -> Result<(), String> {
        // SAFETY: the handle is valid and `jpeg` is readable for its length.
        if unsafe { sys::tj3DecompressHeader(self.ptr, jpeg.as_ptr(), jpeg.len() as sys::size_t) } != 0 {
            self.broken = true;
            return Err(self.error());
        }
        Ok(())
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: the handle came from tj3Init and is destroyed once.
        unsafe { sys::tj3Destroy(self.ptr) };
    }
}

thread_local! {
    static HANDLE: RefCell<Option<Handle>> = const { RefCell::new(None) };
}

/// Run `f` with this thread's transform handle, creating it on first use and replacing it
/// after a failed call.
fn with_handle<T>(f: impl FnOnce(&mut Handle) -> Result<T, String>) -> Result<T, String> {
    HANDLE.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.as_ref().is_none_or(|h| h.broken) {
            *slot = None; // destroy a broken handle before creating its replacement
            *slot = Some(Handle::new()?);
        }
        f(slot.as_mut().expect("initialised above"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(width: u32, height: u32, mcu_width: u32, mcu_height: u32) -> Layout {
        Layout { width, height, mcu_width, mcu_height, orientation: 1 }
    }

    fn b(x: i64, y: i64, w: i64, h: i64) -> CropBox {
        CropBox { x, y, w, h }
    }

    #[test]
    fn snapping_moves_left_and_top_out_and_keeps_right_and_bottom() {
        let l = layout(4000, 3000, 16, 16);
        assert_eq!(snap(&b(0, 0, 10, 10), &l), b(0, 0, 10, 10));
        assert_eq!(snap(&b(16, 32, 100, 50), &l), b(16, 32, 100, 50));
        assert_eq!(snap(&b(17, 33, 100, 50), &l), b(16, 32, 101, 51));
        assert_eq!(snap(&b(31, 47, 1, 1), &l), b(16, 32, 16, 16));
        // 4:2:2 (16x8), 4:4:0 (8x16), 4:4:4 and gray (8x8), 4:1:1 (32x8).
        assert_eq!(snap(&b(17, 9, 5, 5), &layout(100, 100, 16, 8)), b(16, 8, 6, 6));
        assert_eq!(snap(&b(17, 9, 5, 5), &layout(100, 100, 8, 16)), b(16, 0, 6, 14));
        assert_eq!(snap(&b(17, 9, 5, 5), &layout(100, 100, 8, 8)), b(16, 8, 6, 6));
        assert_eq!(snap(&b(63, 9, 5, 5), &layout(100, 100, 32, 8)), b(32, 8, 36, 6));
    }

    #[test]
    fn snapped_boxes_contain_the_request_and_stay_inside() {
        for (mw, mh) in [(8, 8), (16, 8), (8, 16), (16, 16), (32, 8), (8, 32)] {
            let l = layout(203, 117, mw, mh);
            for x in (0..203).step_by(7) {
                for y in (0..117).step_by(5) {
                    let r = b(x, y, (203 - x).min(13), (117 - y).min(29));
                    let s = snap(&r, &l);
                    assert_eq!(s.x % mw as i64, 0, "{r} -> {s}");
                    assert_eq!(s.y % mh as i64, 0, "{r} -> {s}");
                    assert!(s.x <= r.x && s.x > r.x - mw as i64, "{r} -> {s}");
                    assert!(s.y <= r.y && s.y > r.y - mh as i64, "{r} -> {s}");
                    assert_eq!((s.x + s.w, s.y + s.h), (r.x + r.w, r.y + r.h), "{r} -> {s}");
                    s.check(0, 203, 117).unwrap();
                }
            }
        }
    }

    #[test]
    fn edge_boxes_end_at_the_image_edge() {
        // 4000x3000 4:2:0: 3000 is not a multiple of 16, the last iMCU row is partial.
        let l = layout(4000, 3000, 16, 16);
        assert_eq!(snap(&b(3999, 2999, 1, 1), &l), b(3984, 2992, 16, 8));
        assert_eq!(snap(&b(3700, 2601, 300, 399), &l), b(3696, 2592, 304, 408));
    }

    #[test]
    fn orientation_ops_and_perfection() {
        assert_eq!(orientation_op(1).0, sys::TJXOP_TJXOP_NONE);
        assert_eq!(orientation_op(6), (sys::TJXOP_TJXOP_ROT90, true, "a 90° clockwise rotation"));
        assert_eq!(imperfect_edges(sys::TJXOP_TJXOP_NONE, false, false), "");
        assert_eq!(imperfect_edges(sys::TJXOP_TJXOP_TRANSPOSE, false, false), "");
        assert_eq!(imperfect_edges(sys::TJXOP_TJXOP_ROT90, false, true), "");
        assert_eq!(imperfect_edges(sys::TJXOP_TJXOP_ROT90, true, false), "height is");
        assert_eq!(imperfect_edges(sys::TJXOP_TJXOP_HFLIP, false, true), "width is");
        assert_eq!(imperfect_edges(sys::TJXOP_TJXOP_ROT180, false, false), "width and height are");
    }

    #[test]
    fn frame_header_sampling() {
        // SOI, SOF0 (8-bit, 16x16, 3 components: Y 2x2, Cb 1x1, Cr 1x1), SOS.
        let jpeg = [0xFF, 0xD8, 0xFF, 0xC0, 0, 17, 8, 0, 16, 0, 16, 3, 1, 0x22, 0, 2, 0x11, 1, 3, 0x11, 1, 0xFF, 0xDA];
        let want = Frame { marker: 0xC0, width: 16, height: 16, components: 3, hmax: 2, vmax: 2 };
        assert_eq!(frame_header(&jpeg), Some(want));
        assert_eq!(frame_header(&jpeg[..10]), None);
        assert_eq!(frame_header(b"not a jpeg"), None);
        // A tables-only stream (SOI, EOI) has no frame.
        assert_eq!(frame_header(&[0xFF, 0xD8, 0xFF, 0xD9]), None);
    }

    #[test]
    fn non_jpeg_sources_are_refused_with_a_reason() {
        assert!(can_transform(b"\x89PNG\r\n\x1a\n....").unwrap_err().contains("PNG"));
        assert!(can_transform(b"").unwrap_err().contains("empty"));
        assert!(can_transform(&[0xFF, 0xD8, 0xFF, 0xD9]).unwrap_err().contains("header"));
    }
}
