//! EXIF orientation: read the tag from a JPEG's APP1 segment and turn RGB pixels upright,
//! so that crop boxes refer to the image as a person sees it. Also the walk over a JPEG's header
//! segments ([`header_segments`]) that finds it, shared with the lossless path.

/// The marker segments of a JPEG's header, in order: `(marker, payload)` for every segment
/// before the first scan (SOS) or the end of the image, the payload without its length field.
/// Stops at the first malformed segment (no marker where one belongs, a length past the end).
/// The one walk over a JPEG header: EXIF orientation here, the frame header in
/// [`crate::lossless`].
pub fn header_segments(jpeg: &[u8]) -> impl Iterator<Item = (u8, &[u8])> {
    let mut i = if jpeg.starts_with(&[0xFF, 0xD8]) { 2 } else { jpeg.len() };
    std::iter::from_fn(move || {
        while i + 4 <= jpeg.len() {
            if jpeg[i] != 0xFF {
                return None;
            }
            let marker = jpeg[i + 1];
            if marker == 0xFF {
                i += 1; // fill byte
                continue;
            }
            if marker == 0xDA || marker == 0xD9 {
                return None; // start of scan / end of image: the header is over
            }
            let len = u16::from_be_bytes([jpeg[i + 2], jpeg[i + 3]]) as usize;
            let seg = jpeg.get(i + 4..i + 2 + len)?;
            i += 2 + len;
            return Some((marker, seg));
        }
        None
    })
}

/// The EXIF orientation of a JPEG (1 = upright, 2–8 = flipped and/or rotated), if it has one.
/// Malformed EXIF data is ignored (treated as upright), as viewers do.
pub fn jpeg_orientation(jpeg: &[u8]) -> Option<u8> {
    header_segments(jpeg)
        .find(|(marker, seg)| *marker == 0xE1 && seg.starts_with(b"Exif\0\0"))
        .and_then(|(_, seg)| tiff_orientation(&seg[6..]))
}

fn tiff_orientation(t: &[u8]) -> Option<u8> {
    let le = match t.get(0..2)? {
        b"II" => true,
        b"MM" => false,
        _ => return None,
    };
    let u16_at = |o: usize| {
        t.get(o..o + 2).map(|b| if le { u16::from_le_bytes([b[0], b[1]]) } else { u16::from_be_bytes([b[0], b[1]]) })
    };
    let u32_at = |o: usize| {
        t.get(o..o + 4).map(|b| {
            let a = [b[0], b[1], b[2], b[3]];
            if le {
                u32::from_le_bytes(a)
            } else {
                u32::from_be_bytes(a)
            }
        })
    };
    let ifd = u32_at(4)? as usize;
    let count = u16_at(ifd)? as usize;
    (0..count)
        .find_map(|k| {
            let e = ifd + 2 + k * 12;
            (u16_at(e)? == 0x0112).then(|| u16_at(e + 8)).flatten()
        })
        .and_then(|v| u8::try_from(v).ok())
        .filter(|v| (1..=8).contains(v))
}

/// Dimensions after applying `orientation` to a `width`×`height` image.
pub fn oriented_size(orientation: u8, width: u32, height: u32) -> (u32, u32) {
    if orientation >= 5 {
        (height, width)
    } else {
        (width, height)
    }
}

/// Apply an EXIF orientation to packed pixels of `bpp` bytes each, writing into `out`
/// (resized as needed). Returns the new width and height.
pub fn apply_orientation(
    orientation: u8,
    src: &[u8],
    width: u32,
    height: u32,
    bpp: usize,
    out: &mut Vec<u8>,
) -> (u32, u32) {
    let (w, h) = (width as usize, height as usize);
    let (ow, oh) = oriented_size(orientation, width, height);
    let (ow_us, oh_us) = (ow as usize, oh as usize);
    out.resize(ow_us * oh_us * bpp, 0);
    for oy in 0..oh_us {
        for ox in 0..ow_us {
            let (sx, sy) = match orientation {
                2 => (w - 1 - ox, oy),
                3 => (w - 1 - ox, h - 1 - oy),
                4 => (ox, h - 1 - oy),
                5 => (oy, ox),
                6 => (oy, h - 1 - ox),
                7 => (w - 1 - oy, h - 1 - ox),
                8 => (w - 1 - oy, ox),
                _ => (ox, oy),
            };
            let s = (sy * w + sx) * bpp;
            let d = (oy * ow_us + ox) * bpp;
            out[d..d + bpp].copy_from_slice(&src[s..s + bpp]);
        }
    }
    (ow, oh)
}

/// Build a minimal APP1 EXIF segment carrying only an orientation tag (for tests and samples).
pub fn exif_segment(orientation: u8) -> Vec<u8> {
    let mut tiff = b"MM\0\x2a\0\0\0\x08".to_vec();
    tiff.extend_from_slice(&1u16.to_be_bytes()); // one entry
    tiff.extend_from_slice(&0x0112u16.to_be_bytes());
    tiff.extend_from_slice(&3u16.to_be_bytes()); // SHORT
    tiff.extend_from_slice(&1u32.to_be_bytes());
    tiff.extend_from_slice(&(orientation as u16).to_be_bytes());
    tiff.extend_from_slice(&[0, 0]);
    tiff.extend_from_slice(&0u32.to_be_bytes()); // no next IFD
    let mut seg = vec![0xFF, 0xE1];
    seg.extend_from_slice(&((tiff.len() + 8) as u16).to_be_bytes());
    seg.extend_from_slice(b"Exif\0\0");
    seg.extend_from_slice(&tiff);
    seg
}

/// Insert an EXIF orientation segment right after a JPEG's SOI marker.
pub fn with_orientation(jpeg: &[u8], orientation: u8) -> Vec<u8> {
    let mut out = jpeg[..2].to_vec();
    out.extend_from_slice(&exif_segment(orientation));
    out.extend_from_slice(&jpeg[2..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_orientation_and_ignores_garbage() {
        let jpeg = [0xFF, 0xD8, 0xFF, 0xD9];
        assert_eq!(jpeg_orientation(&jpeg), None);
        for o in 1..=8 {
            assert_eq!(jpeg_orientation(&with_orientation(&jpeg, o)), Some(o));
        }
        let mut broken = with_orientation(&jpeg, 6);
        broken.truncate(12);
        assert_eq!(jpeg_orientation(&broken), None);
        assert_eq!(jpeg_orientation(b"not a jpeg"), None);
    }

    #[test]
    fn orientations_move_corners_where_exif_says() {
        // 3x2 image, one byte per pixel: values 0..6 row-major.
        let src: Vec<u8> = (0..6).collect();
        let mut out = Vec::new();
        let cases: [(u8, (u32, u32), [u8; 6]); 8] = [
            (1, (3, 2), [0, 1, 2, 3, 4, 5]),
            (2, (3, 2), [2, 1, 0, 5, 4, 3]),
            (3, (3, 2), [5, 4, 3, 2, 1, 0]),
            (4, (3, 2), [3, 4, 5, 0, 1, 2]),
            (5, (2, 3), [0, 3, 1, 4, 2, 5]),
            (6, (2, 3), [3, 0, 4, 1, 5, 2]),
            (7, (2, 3), [5, 2, 4, 1, 3, 0]),
            (8, (2, 3), [2, 5, 1, 4, 0, 3]),
        ];
        for (o, dims, want) in cases {
            assert_eq!(apply_orientation(o, &src, 3, 2, 1, &mut out), dims, "orientation {o}");
            assert_eq!(out, want, "orientation {o}");
        }
    }
}
