//! The fast path of [`crop_all`](super::crop_all): lossless crops by copying entropy-coded bits.
//!
//! In a sequential Huffman-coded JPEG every 8×8 block is coded as its DC coefficient's
//! *difference* from the previous block of the same component, then its 63 AC coefficients, and
//! the AC part depends on no other block. So a crop on the iMCU grid needs no coefficients at
//! all: one pass over the source's scan notes where each block's AC bits start and end and what
//! its DC value is ([`Index`]); then each crop is written MCU by MCU, with its DC differences
//! computed anew (the first block of a crop row follows a different block than in the source)
//! and the AC bits copied verbatim. `tj3Transform` instead entropy-decodes into coefficient
//! arrays (36 MB for 12 MP at 4:2:0), copies every crop's blocks into arrays of their own and
//! Huffman-encodes them again; this path keeps ~12 bytes per block and writes by bit copy.
//!
//! The crops carry exactly the coefficients `tj3Transform`'s would, so they decode to the same
//! pixels; only the coding differs: the DC table is the standard one (ITU T.81 K.3, whose
//! categories cover every 8-bit DC difference; the source's own may lack a category that a new
//! difference needs) and the AC tables are the source's (every AC symbol copied occurs in the
//! source, so its table has a code for it).
//!
//! Handled: baseline and extended sequential Huffman JPEGs (SOF0/SOF1) with 8-bit samples, one
//! scan holding every component in frame order, any restart interval, no EXIF rotation.
//! Everything else — progressive, arithmetic, several scans, a rotation to apply — and any
//! irregularity in the data (a bad Huffman code, a misplaced restart marker, bytes left over
//! after the last block, a truncated scan) is declined with a reason, and the caller runs
//! `tj3Transform`, which then decides: a corrupt source fails exactly as it did before this path.

use crate::crops::CropBox;

/// Bits looked up at once when decoding a Huffman code; longer codes take the slow loop.
const FAST_BITS: u32 = 10;
/// Zero bytes after the de-stuffed scan, so that reading a whole MCU past a truncated end
/// stays in bounds: an MCU has at most 10 blocks of at most 27 + 63 × 31 bits (~2.5 KB).
const PAD: usize = 4096;
/// The standard DC table (ITU T.81 Annex K.3): code-length counts, then the symbols.
const STD_DC_COUNTS: [u8; 16] = [0, 1, 5, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0];
const STD_DC_SYMBOLS: [u8; 12] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11];

/// Cut every box (already checked, snapped to the iMCU grid) out of `jpeg`, in order.
/// `Err` says why this path declines the source; the caller then uses `tj3Transform`.
pub(super) fn crop_all(jpeg: &[u8], boxes: &[CropBox]) -> Result<Vec<Vec<u8>>, String> {
    let src = parse(jpeg)?;
    let index = Index::build(&src)?;
    let dc = Encoder::new(&STD_DC_COUNTS, &STD_DC_SYMBOLS);
    boxes.iter().map(|b| write_crop(&src, &index, &dc, b)).collect()
}

// ---------------------------------------------------------------------------------------------
// Huffman tables

/// A decoding table built from a DHT definition, plus that definition for writing it out.
struct Huffman {
    /// Indexed by the next `FAST_BITS` bits: `(length << 8) | symbol`, or 0 for a longer code.
    fast: Vec<u16>,
    /// For AC tables, indexed the same way: what skipping one coefficient takes, for codes of
    /// up to `FAST_BITS` bits (0 for longer ones): see [`Skip`].
    skip: Vec<u16>,
    /// `maxcode[l]`: the largest code of length `l`, or -1 when there is none.
    maxcode: [i32; 17],
    /// `offset[l]`: index in `symbols` of a length-`l` code, minus that code.
    offset: [i32; 17],
    symbols: Vec<u8>,
    /// The DHT body for this table without its class/id byte: 16 counts, then the symbols.
    spec: Vec<u8>,
}

impl Huffman {
    fn new(counts: &[u8], symbols: &[u8], dc: bool) -> Result<Huffman, String> {
        let total: usize = counts.iter().map(|&c| c as usize).sum();
        if counts.len() != 16 || total != symbols.len() || total > 256 {
            return Err("malformed Huffman table".into());
        }
        if dc && symbols.iter().any(|&s| s > 15) {
            return Err("malformed DC Huffman table".into());
        }
        let mut fast = vec![0u16; 1 << FAST_BITS];
        let (mut maxcode, mut offset) = ([-1i32; 17], [0i32; 17]);
        let (mut code, mut k) = (0u32, 0usize);
        for len in 1..=16u32 {
            let n = counts[len as usize - 1] as usize;
            if n > 0 {
                offset[len as usize] = k as i32 - code as i32;
                for &sym in &symbols[k..k + n] {
                    // A code must fit in its length (libjpeg: "Bad Huffman table").
                    if code >= 1 << len {
                        return Err("malformed Huffman table: codes overflow their lengths".into());
                    }
                    if len <= FAST_BITS {
                        let shift = FAST_BITS - len;
                        let first = (code << shift) as usize;
                        fast[first..first + (1 << shift)].fill(((len as u16) << 8) | sym as u16);
                    }
                    code += 1;
                }
                k += n;
                maxcode[len as usize] = code as i32 - 1;
            }
            code <<= 1;
        }
        let skip = fast.iter().map(|&e| if e == 0 { 0 } else { Skip::entry(e as u8, (e >> 8) as u32) }).collect();
        let mut spec = counts.to_vec();
        spec.extend_from_slice(symbols);
        Ok(Huffman { fast, skip, maxcode, offset, symbols: symbols.to_vec(), spec })
    }

    /// Decode the code at the top of `bits` (left-aligned): `(symbol, code length)`.
    #[inline(always)]
    fn decode(&self, bits: u64) -> Option<(u8, u32)> {
        let e = self.fast[(bits >> (64 - FAST_BITS)) as usize];
        if e != 0 {
            return Some((e as u8, (e >> 8) as u32));
        }
        for len in FAST_BITS + 1..=16 {
            let code = (bits >> (64 - len)) as i32;
            if code <= self.maxcode[len as usize] {
                return self.symbols.get((self.offset[len as usize] + code) as usize).map(|&s| (s, len));
            }
        }
        None
    }
}

/// One AC symbol read as what it takes to skip it: the bits it spans (code and value), how far
/// it moves through the block, and whether it ends the block. Packed in a `u16` table entry:
/// bits 0–5 the bit count (≤ 31), bits 8–12 the advance (1–16), bit 14 end of block, bit 15 set
/// in every entry so that 0 means "no entry".
struct Skip;

impl Skip {
    const EOB: u16 = 1 << 14;

    fn entry(rs: u8, len: u32) -> u16 {
        let (run, size) = ((rs >> 4) as u32, (rs & 15) as u32);
        let (bits, advance, eob) = match (run, size) {
            (15, 0) => (len, 16, 0),
            (_, 0) => (len, 0, Skip::EOB),
            _ => (len + size, run + 1, 0),
        };
        0x8000 | eob | (advance as u16) << 8 | bits as u16
    }
}

/// Reads bits MSB first from de-stuffed data, keeping 56–63 of them in a register
/// (refill as in F. Giesen, "Reading bits in far too many ways", variant 4).
struct Reader<'a> {
    data: &'a [u8],
    /// Next byte to load.
    next: usize,
    /// Left-aligned; the top `bits` bits are the stream from `pos()` on.
    buf: u64,
    bits: u32,
}

impl<'a> Reader<'a> {
    fn new(data: &'a [u8]) -> Reader<'a> {
        let mut r = Reader { data, next: 0, buf: 0, bits: 0 };
        r.refill();
        r
    }

    /// Top up to at least 56 bits. `data` must hold 8 bytes from `next` (the scan's padding).
    #[inline(always)]
    fn refill(&mut self) {
        let word: [u8; 8] = self.data[self.next..self.next + 8].try_into().expect("8 bytes");
        self.buf |= u64::from_be_bytes(word) >> self.bits;
        self.next += ((63 - self.bits) >> 3) as usize;
        self.bits |= 56;
    }

    #[inline(always)]
    fn consume(&mut self, n: u32) {
        self.buf <<= n;
        self.bits -= n;
    }

    /// Bits consumed so far.
    #[inline(always)]
    fn pos(&self) -> usize {
        self.next * 8 - self.bits as usize
    }

    /// Move to bit `pos`, a byte boundary (after a restart marker).
    fn seek_byte(&mut self, pos: usize) {
        *self = Reader { data: self.data, next: pos / 8, buf: 0, bits: 0 };
        self.refill();
    }
}

/// Codes of a table for writing: `(code, length)` per symbol, length 0 when absent.
struct Encoder {
    codes: [(u32, u32); 256],
    spec: Vec<u8>,
}

impl Encoder {
    fn new(counts: &[u8; 16], symbols: &[u8]) -> Encoder {
        let mut codes = [(0u32, 0u32); 256];
        let (mut code, mut k) = (0u32, 0usize);
        for len in 1..=16u32 {
            for _ in 0..counts[len as usize - 1] {
                codes[symbols[k] as usize] = (code, len);
                code += 1;
                k += 1;
            }
            code <<= 1;
        }
        let mut spec = counts.to_vec();
        spec.extend_from_slice(symbols);
        Encoder { codes, spec }
    }
}

// ---------------------------------------------------------------------------------------------
// Parsing the headers

/// One component of the frame, with the tables the scan gives it.
#[derive(Debug, Clone, Copy)]
struct Component {
    id: u8,
    h: u8,
    v: u8,
    tq: u8,
    td: usize,
    ta: usize,
}

/// What the writer needs from the source, and its scan de-stuffed.
struct Source<'a> {
    /// SOF0 or SOF1, written back as found.
    sof: u8,
    width: u32,
    height: u32,
    comps: Vec<Component>,
    dc: [Option<Huffman>; 4],
    ac: [Option<Huffman>; 4],
    /// Whole DQT and ICC-profile (APP2) segments, marker included, copied into every crop.
    dqt: Vec<&'a [u8]>,
    icc: Vec<&'a [u8]>,
    /// JFIF version, density unit and densities (7 bytes), when the source has a JFIF marker.
    jfif: Option<&'a [u8]>,
    restart_interval: usize,
    scan: Scan,
}

/// A scan's entropy-coded data, de-stuffed.
struct Scan {
    /// The data with stuffed zeros and restart markers removed, then `PAD` zeros.
    data: Vec<u8>,
    /// Length of `data` without the padding.
    len: usize,
    /// Byte offsets in `data` where each restart marker was, with its number (0–7).
    restarts: Vec<(usize, u8)>,
}

fn be16(b: &[u8], at: usize) -> Result<usize, String> {
    b.get(at..at + 2)
        .map(|s| u16::from_be_bytes([s[0], s[1]]) as usize)
        .ok_or_else(|| "truncated marker segment".into())
}

fn parse(jpeg: &[u8]) -> Result<Source<'_>, String> {
    if !jpeg.starts_with(&[0xFF, 0xD8]) {
        return Err("not a JPEG".into());
    }
    let mut frame: Option<(u8, u32, u32, Vec<Component>)> = None;
    let (mut dc, mut ac): ([Option<Huffman>; 4], [Option<Huffman>; 4]) = Default::default();
    let (mut dqt, mut icc, mut jfif, mut restart_interval) = (Vec::new(), Vec::new(), None, 0);
    let mut quant_defined = [false; 4];
    let mut i = 2;
    loop {
        if jpeg.get(i) != Some(&0xFF) {
            return Err("no marker where one was expected".into());
        }
        let marker = *jpeg.get(i + 1).ok_or("truncated before the scan")?;
        if marker == 0xFF {
            i += 1;
            continue;
        }
        if matches!(marker, 0x01 | 0xD0..=0xD9) {
            return Err(format!("unexpected marker 0x{marker:02X} before the scan"));
        }
        let len = be16(jpeg, i + 2)?;
        let seg = jpeg.get(i..i + 2 + len).filter(|_| len >= 2).ok_or("truncated marker segment")?;
        let body = &seg[4..];
        match marker {
            0xC0 | 0xC1 => {
                if frame.is_some() {
                    return Err("two frame headers".into());
                }
                let (precision, count) = (*body.first().ok_or("short SOF")?, *body.get(5).ok_or("short SOF")? as usize);
                if precision != 8 {
                    return Err(format!("{precision}-bit samples"));
                }
                let (height, width) = (be16(body, 1)? as u32, be16(body, 3)? as u32);
                let spec = body.get(6..6 + 3 * count).ok_or("short SOF")?;
                let comps: Vec<Component> = spec
                    .chunks_exact(3)
                    .map(|c| Component { id: c[0], h: c[1] >> 4, v: c[1] & 15, tq: c[2], td: 0, ta: 0 })
                    .collect();
                if !(count == 1 || count == 3) || width == 0 || height == 0 {
                    return Err(format!("{count} components, {width}x{height}"));
                }
                if comps.iter().any(|c| !(1..=4).contains(&c.h) || !(1..=4).contains(&c.v) || c.tq > 3) {
                    return Err("unusual sampling factors or quantisation table".into());
                }
                frame = Some((marker, width, height, comps));
            }
            0xC2 => return Err("progressive JPEG".into()),
            0xC3 | 0xC5..=0xC7 | 0xCB | 0xCD..=0xCF => return Err("lossless or hierarchical JPEG".into()),
            0xC9 | 0xCA | 0xCC => return Err("arithmetic-coded JPEG".into()),
            0xC4 => {
                let mut t = body;
                while !t.is_empty() {
                    let (class, id) = (t[0] >> 4, (t[0] & 15) as usize);
                    let counts = t.get(1..17).ok_or("short DHT")?;
                    let n: usize = counts.iter().map(|&c| c as usize).sum();
                    let symbols = t.get(17..17 + n).ok_or("short DHT")?;
                    if class > 1 || id > 3 {
                        return Err("malformed DHT".into());
                    }
                    let table = Huffman::new(counts, symbols, class == 0)?;
                    if class == 0 {
                        dc[id] = Some(table);
                    } else {
                        ac[id] = Some(table);
                    }
                    t = &t[17 + n..];
                }
            }
            0xDB => {
                let mut t = body;
                while let Some(&pq_tq) = t.first() {
                    let size = if pq_tq >> 4 == 0 { 65 } else { 129 };
                    if t.len() < size || (pq_tq & 15) > 3 {
                        return Err("malformed DQT".into());
                    }
                    quant_defined[(pq_tq & 15) as usize] = true;
                    t = &t[size..];
                }
                dqt.push(seg);
            }
            0xDD => restart_interval = be16(body, 0)?,
            0xE0 if body.starts_with(b"JFIF\0") && body.len() >= 12 => jfif = Some(&body[5..12]),
            0xE2 if body.starts_with(b"ICC_PROFILE\0") => icc.push(seg),
            0xDA => {
                let (sof, width, height, mut comps) = frame.ok_or("scan before the frame header")?;
                let ns = *body.first().ok_or("short SOS")? as usize;
                let spec = body.get(1..1 + 2 * ns).ok_or("short SOS")?;
                if ns != comps.len() || body.get(1 + 2 * ns..4 + 2 * ns) != Some(&[0, 63, 0][..]) {
                    return Err("the first scan does not hold every component sequentially".into());
                }
                for (c, s) in comps.iter_mut().zip(spec.chunks_exact(2)) {
                    if s[0] != c.id {
                        return Err("scan components out of frame order".into());
                    }
                    (c.td, c.ta) = ((s[1] >> 4) as usize, (s[1] & 15) as usize);
                    let defined = dc.get(c.td).is_some_and(Option::is_some)
                        && ac.get(c.ta).is_some_and(Option::is_some)
                        && quant_defined[c.tq as usize];
                    if !defined {
                        return Err("a table the scan uses is not defined".into());
                    }
                }
                let scan = destuff(&jpeg[i + 2 + len..])?;
                return Ok(Source { sof, width, height, comps, dc, ac, dqt, icc, jfif, restart_interval, scan });
            }
            _ => {}
        }
        i += 2 + len;
    }
}

/// Remove byte stuffing and restart markers from the scan that starts `scan`, which must end
/// with EOI.
fn destuff(scan: &[u8]) -> Result<Scan, String> {
    let mut data = Vec::with_capacity(scan.len() + PAD);
    let mut restarts = Vec::new();
    let mut i = 0;
    loop {
        let ff = memchr::memchr(0xFF, &scan[i..]).ok_or("the scan has no end (truncated?)")?;
        data.extend_from_slice(&scan[i..i + ff]);
        let mut m = i + ff + 1;
        while scan.get(m) == Some(&0xFF) {
            m += 1; // fill bytes
        }
        match *scan.get(m).ok_or("the scan has no end (truncated?)")? {
            0x00 => data.push(0xFF),
            r @ 0xD0..=0xD7 => restarts.push((data.len(), r - 0xD0)),
            0xD9 => break,
            other => return Err(format!("marker 0xFF{other:02X} after the first scan (several scans?)")),
        }
        i = m + 1;
    }
    let len = data.len();
    if len > (u32::MAX / 8) as usize - PAD {
        return Err("scan too large".into());
    }
    data.resize(len + PAD, 0);
    Ok(Scan { data, len, restarts })
}

// ---------------------------------------------------------------------------------------------
// The index: one pass over the scan

/// Where one block's AC bits are in the de-stuffed scan, and its DC value.
#[derive(Debug, Clone, Copy)]
struct Block {
    ac_start: u32,
    ac_end: u32,
    dc: i32,
}

/// Every block of the scan, MCU by MCU in scan order.
struct Index {
    blocks: Vec<Block>,
    mcu_cols: usize,
    /// Scan component of each block of an MCU.
    layout: Vec<usize>,
}

/// 64 bits of `data` starting at bit `pos`, left-aligned (at least 57 of them meaningful).
#[inline(always)]
fn peek(data: &[u8], pos: usize) -> u64 {
    let at = pos >> 3;
    let word: [u8; 8] = data[at..at + 8].try_into().expect("8 bytes");
    u64::from_be_bytes(word) << (pos & 7)
}

/// The signed value of `bits` read for a coefficient of category `size` (T.81 F.2.2.1 EXTEND).
#[inline(always)]
fn extend(bits: i32, size: u32) -> i32 {
    if size == 0 {
        0
    } else if bits < 1 << (size - 1) {
        bits - (1 << size) + 1
    } else {
        bits
    }
}

/// MCU size in pixels: 8×8 for a single component (its scan is not interleaved, one block per
/// MCU whatever its factors), else 8 × the largest sampling factors.
fn mcu_size(comps: &[Component]) -> (usize, usize) {
    if comps.len() == 1 {
        return (8, 8);
    }
    let hmax = comps.iter().map(|c| c.h as usize).max().unwrap_or(1);
    let vmax = comps.iter().map(|c| c.v as usize).max().unwrap_or(1);
    (8 * hmax, 8 * vmax)
}

/// MCU grid and block layout of a scan: `(mcu_cols, mcu_rows, component of each MCU block)`.
fn mcu_layout(comps: &[Component], width: u32, height: u32) -> (usize, usize, Vec<usize>) {
    let (mcu_w, mcu_h) = mcu_size(comps);
    let layout = match comps.len() {
        1 => vec![0],
        _ => {
            comps.iter().enumerate().flat_map(|(ci, c)| std::iter::repeat_n(ci, c.h as usize * c.v as usize)).collect()
        }
    };
    ((width as usize).div_ceil(mcu_w), (height as usize).div_ceil(mcu_h), layout)
}

impl Index {
    fn build(src: &Source) -> Result<Index, String> {
        let (mcu_cols, mcu_rows, layout) = mcu_layout(&src.comps, src.width, src.height);
        if layout.len() > 10 {
            return Err("more than 10 blocks per MCU".into());
        }
        let mcus = mcu_cols * mcu_rows;
        // A block takes at least 2 bits (DC and end-of-block codes), so a header claiming more
        // blocks than the data can hold does not get to reserve memory for them.
        let mut blocks = Vec::with_capacity((mcus * layout.len()).min(src.scan.len * 4));
        let tables: Vec<(&Huffman, &Huffman)> = layout
            .iter()
            .map(|&c| {
                let comp = &src.comps[c];
                (src.dc[comp.td].as_ref().expect("checked"), src.ac[comp.ta].as_ref().expect("checked"))
            })
            .collect();
        let limit = src.scan.len * 8;
        let (mut r, mut pred, mut restarts) = (Reader::new(&src.scan.data), [0i32; 3], src.scan.restarts.iter());
        for m in 0..mcus {
            if src.restart_interval > 0 && m > 0 && m % src.restart_interval == 0 {
                let byte = r.pos().div_ceil(8);
                match restarts.next() {
                    Some(&(at, n)) if at == byte && n as usize == (m / src.restart_interval - 1) % 8 => {}
                    _ => return Err(format!("restart marker missing or misplaced before MCU {m}")),
                }
                r.seek_byte(byte * 8);
                pred = [0; 3];
            }
            for (j, &(dc, ac)) in tables.iter().enumerate() {
                // ≥ 56 bits after a refill: a DC code and its value take at most 16 + 15.
                r.refill();
                let (size, len) = dc.decode(r.buf).ok_or("bad Huffman code")?;
                let size = size as u32;
                let bits = if size == 0 { 0 } else { ((r.buf << len) >> (64 - size)) as i32 };
                r.consume(len + size);
                let c = layout[j];
                pred[c] = pred[c].wrapping_add(extend(bits, size));
                let ac_start = r.pos();
                let mut k = 1u32;
                while k < 64 {
                    r.refill();
                    let mut e = ac.skip[(r.buf >> (64 - FAST_BITS)) as usize];
                    if e == 0 {
                        let (rs, len) = ac.decode(r.buf).ok_or("bad Huffman code")?;
                        e = Skip::entry(rs, len);
                    }
                    r.consume((e & 63) as u32);
                    if e & Skip::EOB != 0 {
                        break;
                    }
                    k += ((e >> 8) & 31) as u32;
                }
                if k > 64 {
                    return Err("coefficients past the end of a block".into());
                }
                blocks.push(Block { ac_start: ac_start as u32, ac_end: r.pos() as u32, dc: pred[c] });
            }
            if r.pos() > limit {
                return Err("the scan ends before its last block (truncated?)".into());
            }
        }
        let pos = r.pos();
        if restarts.next().is_some() || pos.div_ceil(8) != src.scan.len {
            return Err("data left over after the last block".into());
        }
        Ok(Index { blocks, mcu_cols, layout })
    }
}

// ---------------------------------------------------------------------------------------------
// Writing a crop

/// Appends bits MSB first, stuffing a zero after every 0xFF byte.
struct BitWriter {
    out: Vec<u8>,
    acc: u64,
    /// Pending bits at the bottom of `acc` (< 32 between calls).
    n: u32,
}

impl BitWriter {
    /// Append the low `len` (≤ 32) bits of `bits`.
    #[inline(always)]
    fn put(&mut self, bits: u32, len: u32) {
        self.acc = (self.acc << len) | (bits as u64 & ((1u64 << len) - 1));
        self.n += len;
        if self.n >= 32 {
            self.n -= 32;
            let word = (self.acc >> self.n) as u32;
            let x = !word;
            if (x.wrapping_sub(0x0101_0101) & !x & 0x8080_8080) == 0 {
                self.out.extend_from_slice(&word.to_be_bytes()); // no 0xFF byte in it
            } else {
                for b in word.to_be_bytes() {
                    self.out.push(b);
                    if b == 0xFF {
                        self.out.push(0);
                    }
                }
            }
        }
    }

    /// Pad the last byte with 1 bits (T.81 F.1.2.3) and write what is pending.
    fn finish(mut self) -> Vec<u8> {
        let pad = (8 - self.n % 8) % 8;
        self.acc = (self.acc << pad) | ((1 << pad) - 1);
        self.n += pad;
        while self.n >= 8 {
            self.n -= 8;
            let b = (self.acc >> self.n) as u8;
            self.out.push(b);
            if b == 0xFF {
                self.out.push(0);
            }
        }
        self.out
    }
}

fn segment(out: &mut Vec<u8>, marker: u8, body: &[u8]) {
    out.extend_from_slice(&[0xFF, marker]);
    out.extend_from_slice(&(body.len() as u16 + 2).to_be_bytes());
    out.extend_from_slice(body);
}

fn write_crop(src: &Source, index: &Index, dc: &Encoder, b: &CropBox) -> Result<Vec<u8>, String> {
    let (mcu_w, mcu_h) = mcu_size(&src.comps);
    let (x, y, w, h) = (b.x as usize, b.y as usize, b.w as usize, b.h as usize);
    if x % mcu_w != 0 || y % mcu_h != 0 || w == 0 || h == 0 || x + w > src.width as usize || y + h > src.height as usize
    {
        return Err(format!("box {b} is not snapped to the {mcu_w}x{mcu_h} grid inside the image"));
    }
    let (x0, y0, cols, rows) = (x / mcu_w, y / mcu_h, w.div_ceil(mcu_w), h.div_ceil(mcu_h));

    let bpm = index.layout.len();
    let ac_bits: usize = (y0..y0 + rows)
        .map(|r| {
            let first = &index.blocks[(r * index.mcu_cols + x0) * bpm];
            let last = &index.blocks[(r * index.mcu_cols + x0 + cols) * bpm - 1];
            (last.ac_end - first.ac_start) as usize
        })
        .sum();
    let mut out = Vec::with_capacity(1024 + src.icc.iter().map(|s| s.len()).sum::<usize>() + ac_bits / 7);

    // Headers: SOI, JFIF, ICC profile, quantisation tables, frame, Huffman tables, scan.
    out.extend_from_slice(&[0xFF, 0xD8]);
    let mut jfif = b"JFIF\0".to_vec();
    jfif.extend_from_slice(src.jfif.unwrap_or(&[1, 1, 0, 0, 1, 0, 1]));
    jfif.extend_from_slice(&[0, 0]);
    segment(&mut out, 0xE0, &jfif);
    for s in src.icc.iter().chain(&src.dqt) {
        out.extend_from_slice(s);
    }
    let mut sof = vec![8];
    sof.extend_from_slice(&(h as u16).to_be_bytes());
    sof.extend_from_slice(&(w as u16).to_be_bytes());
    sof.push(src.comps.len() as u8);
    for c in &src.comps {
        sof.extend_from_slice(&[c.id, c.h << 4 | c.v, c.tq]);
    }
    segment(&mut out, src.sof, &sof);
    let mut dht = vec![0x00];
    dht.extend_from_slice(&dc.spec);
    let mut written = [false; 4];
    for c in &src.comps {
        if !std::mem::replace(&mut written[c.ta], true) {
            dht.push(0x10 | c.ta as u8);
            dht.extend_from_slice(&src.ac[c.ta].as_ref().expect("checked").spec);
        }
    }
    segment(&mut out, 0xC4, &dht);
    let mut sos = vec![src.comps.len() as u8];
    for c in &src.comps {
        sos.extend_from_slice(&[c.id, c.ta as u8]); // every component: DC table 0, its AC table
    }
    sos.extend_from_slice(&[0, 63, 0]);
    segment(&mut out, 0xDA, &sos);

    // The scan: new DC differences, AC bits copied.
    let data = &src.scan.data[..];
    let mut bw = BitWriter { out, acc: 0, n: 0 };
    let mut pred = [0i32; 3];
    for r in y0..y0 + rows {
        let first = (r * index.mcu_cols + x0) * bpm;
        for (j, blk) in index.blocks[first..first + cols * bpm].iter().enumerate() {
            let c = index.layout[j % bpm];
            let diff = blk.dc.wrapping_sub(pred[c]);
            pred[c] = blk.dc;
            let size = 32 - diff.unsigned_abs().leading_zeros();
            let (code, len) = dc.codes.get(size as usize).copied().unwrap_or((0, 0));
            if len == 0 {
                return Err(format!("DC difference {diff} out of range"));
            }
            bw.put(code, len);
            if size > 0 {
                bw.put((if diff < 0 { diff - 1 } else { diff }) as u32, size);
            }
            let (mut a, end) = (blk.ac_start as usize, blk.ac_end as usize);
            while end - a >= 32 {
                bw.put((peek(data, a) >> 32) as u32, 32);
                a += 32;
            }
            if end > a {
                let n = (end - a) as u32;
                bw.put((peek(data, a) >> (64 - n)) as u32, n);
            }
        }
    }
    let mut out = bw.finish();
    out.extend_from_slice(&[0xFF, 0xD9]);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::super::{crop_all_with, inspect, snap, Method};
    use super::*;
    use crate::sample;
    use libc::c_int;
    use turbojpeg::PixelFormat;
    use turbojpeg_sys as sys;

    /// Encode with libjpeg-turbo's own API: every subsampling, restart markers every
    /// `restart_blocks` MCUs (0 = none), Huffman optimisation on or off.
    fn encode(rgb: &[u8], w: u32, h: u32, subsamp: sys::TJSAMP, restart_blocks: c_int, optimize: bool) -> Vec<u8> {
        // SAFETY: a fresh handle, used and destroyed here; `rgb` holds w*h*3 bytes; the output
        // buffer is allocated by the library and freed with tj3Free after copying.
        unsafe {
            let h_ = sys::tj3Init(sys::TJINIT_TJINIT_COMPRESS as c_int);
            assert!(!h_.is_null());
            for (p, v) in [
                (sys::TJPARAM_TJPARAM_QUALITY, 90),
                (sys::TJPARAM_TJPARAM_SUBSAMP, subsamp as c_int),
                (sys::TJPARAM_TJPARAM_RESTARTBLOCKS, restart_blocks),
                (sys::TJPARAM_TJPARAM_OPTIMIZE, optimize as c_int),
            ] {
                assert_eq!(sys::tj3Set(h_, p as c_int, v), 0);
            }
            let (mut buf, mut size): (*mut u8, sys::size_t) = (std::ptr::null_mut(), 0);
            let rc = sys::tj3Compress8(
                h_,
                rgb.as_ptr(),
                w as c_int,
                0,
                h as c_int,
                sys::TJPF_TJPF_RGB as c_int,
                &mut buf,
                &mut size,
            );
            assert_eq!(rc, 0);
            let out = std::slice::from_raw_parts(buf, size as usize).to_vec();
            sys::tj3Free(buf.cast());
            sys::tj3Destroy(h_);
            out
        }
    }

    const SUBSAMPS: [sys::TJSAMP; 7] = [
        sys::TJSAMP_TJSAMP_444,
        sys::TJSAMP_TJSAMP_422,
        sys::TJSAMP_TJSAMP_420,
        sys::TJSAMP_TJSAMP_440,
        sys::TJSAMP_TJSAMP_411,
        sys::TJSAMP_TJSAMP_441,
        sys::TJSAMP_TJSAMP_GRAY,
    ];

    fn boxes(w: u32, h: u32) -> Vec<CropBox> {
        let (wi, hi) = (w as i64, h as i64);
        let mut boxes = sample::boxes(w, h, 12, 7);
        boxes.extend([
            CropBox { x: 0, y: 0, w: wi, h: hi },
            CropBox { x: 0, y: 0, w: 1, h: 1 },
            CropBox { x: wi - 1, y: hi - 1, w: 1, h: 1 },
            CropBox { x: 33, y: 17, w: wi - 40, h: 9 },
        ]);
        boxes
    }

    /// The fast path takes the source (no fallback), and every crop decodes to exactly the
    /// pixels of `tj3Transform`'s crop of the same box, in RGB and in every plane.
    fn same_as_tj3(jpeg: &[u8], boxes: &[CropBox], ctx: &str) {
        let layout = inspect(jpeg).unwrap();
        let snapped: Vec<CropBox> = boxes.iter().map(|b| snap(b, &layout)).collect();
        let fast = crop_all(jpeg, &snapped).unwrap_or_else(|e| panic!("{ctx}: declined: {e}"));
        let reference = crop_all_with(jpeg, boxes, Method::Tj3Transform).unwrap();
        let public = crop_all_with(jpeg, boxes, Method::Fastest).unwrap();
        for (i, ((f, r), p)) in fast.iter().zip(&reference).zip(&public).enumerate() {
            assert_eq!(f, &p.jpeg, "{ctx}: crop_all did not take the fast path");
            for format in [PixelFormat::RGB, PixelFormat::GRAY] {
                let (a, b) =
                    (turbojpeg::decompress(f, format).unwrap(), turbojpeg::decompress(&r.jpeg, format).unwrap());
                assert_eq!((a.width, a.height), (b.width, b.height), "{ctx}: crop #{i} size");
                assert!(a.pixels == b.pixels, "{ctx}: crop #{i} {} decodes differently", snapped[i]);
            }
            if !ctx.contains("gray") {
                let (a, b) = (turbojpeg::decompress_to_yuv(f).unwrap(), turbojpeg::decompress_to_yuv(&r.jpeg).unwrap());
                assert!(a.pixels == b.pixels, "{ctx}: crop #{i} planes differ");
            }
        }
    }

    #[test]
    fn crops_decode_exactly_like_tj3transform_for_every_sampling_and_restart_interval() {
        // Neither side a multiple of any iMCU size.
        let (w, h) = (331, 251);
        let rgb = sample::photo(w, h, 3);
        for subsamp in SUBSAMPS {
            for (restart, optimize) in [(0, false), (1, false), (7, false), (0, true), (3, true)] {
                let jpeg = encode(&rgb, w, h, subsamp, restart, optimize);
                let gray = if subsamp == sys::TJSAMP_TJSAMP_GRAY { " gray" } else { "" };
                let ctx = format!("subsamp {subsamp}{gray}, restart every {restart} MCUs, optimize {optimize}");
                same_as_tj3(&jpeg, &boxes(w, h), &ctx);
            }
        }
    }

    #[test]
    fn the_sample_workload_takes_the_fast_path() {
        let (w, h) = (1600, 1200);
        let jpeg = sample::encode_jpeg(&sample::photo(w, h, 11), w, h, 90, false);
        same_as_tj3(&jpeg, &sample::boxes(w, h, 50, 3), "sample-like 1600x1200");
    }

    #[test]
    fn sources_it_cannot_copy_are_declined_with_a_reason() {
        let (w, h) = (160, 128);
        let rgb = sample::photo(w, h, 5);
        let boxes = [CropBox { x: 16, y: 16, w: 40, h: 30 }];
        let progressive = sample::encode_jpeg(&rgb, w, h, 90, true);
        assert_eq!(crop_all(&progressive, &boxes).unwrap_err(), "progressive JPEG");
        let base = encode(&rgb, w, h, sys::TJSAMP_TJSAMP_420, 0, false);
        // Truncated inside the scan, and with its EOI missing.
        for cut in [base.len() - 2, base.len() / 2] {
            assert!(crop_all(&base[..cut], &boxes).unwrap_err().contains("truncated"), "cut at {cut}");
        }
        // Bytes after the last block, before EOI.
        let mut extra = base[..base.len() - 2].to_vec();
        extra.extend_from_slice(&[0x12, 0x34, 0xFF, 0xD9]);
        assert!(crop_all(&extra, &boxes).unwrap_err().contains("left over"));
        // A misplaced restart marker.
        let restart = encode(&rgb, w, h, sys::TJSAMP_TJSAMP_420, 2, false);
        let at = restart.windows(2).position(|m| m == [0xFF, 0xD0]).unwrap();
        let mut moved = restart.clone();
        moved[at + 1] = 0xD3;
        assert!(crop_all(&moved, &boxes).unwrap_err().contains("restart"));
        // Corrupt entropy-coded data: declined or copied, never a panic.
        let mut corrupt = base.clone();
        let mid = corrupt.len() / 2;
        corrupt[mid..mid + 40].fill(0xFE);
        let _ = crop_all(&corrupt, &boxes);
        // A box off the grid (the caller snaps first).
        assert!(crop_all(&base, &[CropBox { x: 3, y: 0, w: 10, h: 10 }]).unwrap_err().contains("snapped"));
    }

    #[test]
    fn bit_writer_stuffs_and_pads() {
        let mut bw = BitWriter { out: Vec::new(), acc: 0, n: 0 };
        bw.put(0xFF, 8);
        bw.put(0x0, 4);
        bw.put(0xFFFF_FFFF, 32);
        bw.put(0b1, 1);
        // 0xFF, then 0000 + 32 ones + 1 + three padding ones: 0x0F FF FF FF FF; each 0xFF stuffed.
        let out = bw.finish();
        assert_eq!(out, [0xFF, 0x00, 0x0F, 0xFF, 0x00, 0xFF, 0x00, 0xFF, 0x00, 0xFF, 0x00]);
    }

    #[test]
    fn huffman_tables_decode_their_own_codes() {
        let t = Huffman::new(&STD_DC_COUNTS, &STD_DC_SYMBOLS, true).unwrap();
        let e = Encoder::new(&STD_DC_COUNTS, &STD_DC_SYMBOLS);
        for s in 0..12u8 {
            let (code, len) = e.codes[s as usize];
            assert_eq!(t.decode((code as u64) << (64 - len)), Some((s, len)), "symbol {s}");
        }
        // Too many codes of one length.
        assert!(Huffman::new(&[3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[0, 1, 2], true).is_err());
        assert!(Huffman::new(&[1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[16], true).is_err());
    }
}
