//! What cameras and editors write into images besides the picture: EXIF
//! (the place and time a photo was taken, the phone that took it), XMP,
//! comments and text chunks. Stripped before an image is sealed, unless
//! the person asks to keep it, by rewriting the container's segments
//! (`img-parts`) without decoding or re-encoding the picture.
//!
//! What stays is a list of what a picture needs; everything else goes.
//!
//! - JPEG: APP0 (JFIF), APP2 ICC profiles (colours), APP14 (Adobe: needed
//!   to decode some colour spaces) and the segments that code the picture.
//!   Every other APPn and every comment goes, between progressive scans
//!   too, and so does everything after the end of the image (phones put a
//!   second picture or a short video there, with metadata of its own).
//! - PNG: the chunks that code the picture and its colours; text, EXIF,
//!   time and any unknown chunk go.
//! - WebP: the picture's chunks, its animation and ICC profile; EXIF, XMP
//!   and any unknown chunk go, and the header stops announcing them.
//!
//! A JPEG's EXIF orientation stays, alone: what goes back in its place is
//! an EXIF block of that one tag (how to turn the picture says nothing of
//! where, when or with what it was taken), so a photo taken sideways does
//! not show on its side.
//!
//! The file's type is read from its first bytes, never from its name: a
//! JPEG called `photo` or `IMG.jfif` is stripped like one called `.jpg`,
//! and a format whose metadata cannot be removed here (HEIF and AVIF,
//! TIFF and camera raw, MP4 and QuickTime video) is refused unless the
//! person asks to send it as it is.

use img_parts::Bytes;
use img_parts::jpeg::{Jpeg, JpegSegment, markers};
use img_parts::png::Png;
use img_parts::riff::RiffContent;
use img_parts::webp::WebP;

use crate::error::{ClientError, Result};

/// The image formats whose metadata is stripped, by MIME type.
pub fn strips(mime_type: &str) -> bool {
    matches!(mime_type, "image/jpeg" | "image/png" | "image/webp")
}

/// What a file's first bytes say it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sniffed {
    /// An image whose metadata [`strip`] removes: its MIME type.
    Strippable(&'static str),
    /// A format that carries camera metadata [`strip`] cannot remove: its
    /// MIME type, and what to call it.
    Unstrippable(&'static str, &'static str),
    /// Anything else.
    Other,
}

/// The type of a file from its first bytes (32 are enough).
pub fn sniff(head: &[u8]) -> Sniffed {
    if head.starts_with(&[0xFF, 0xD8, 0xFF]) {
        return Sniffed::Strippable("image/jpeg");
    }
    if head.starts_with(b"\x89PNG\r\n\x1a\n") {
        return Sniffed::Strippable("image/png");
    }
    if head.starts_with(b"RIFF") && head.get(8..12) == Some(b"WEBP") {
        return Sniffed::Strippable("image/webp");
    }
    if head.starts_with(b"II*\0") || head.starts_with(b"MM\0*") {
        return Sniffed::Unstrippable("image/tiff", "TIFF and camera raw");
    }
    if head.get(4..8) == Some(b"ftyp") {
        let brand = head.get(8..12).unwrap_or_default();
        return match brand {
            b"heic" | b"heix" | b"hevc" | b"hevx" | b"heim" | b"heis" | b"hevm" | b"hevs"
            | b"mif1" | b"msf1" => Sniffed::Unstrippable("image/heic", "HEIC"),
            b"avif" | b"avis" => Sniffed::Unstrippable("image/avif", "AVIF"),
            b"qt  " => Sniffed::Unstrippable("video/quicktime", "QuickTime video"),
            // Audio (AAC in MP4): no camera, no place; typed by its name.
            b"M4A " | b"M4B " => Sniffed::Other,
            _ => Sniffed::Unstrippable("video/mp4", "MP4 video"),
        };
    }
    Sniffed::Other
}

/// The JPEG segments a picture needs, besides the ones that code it: the
/// JFIF header (its embedded thumbnail, which may show the uncropped
/// original, is cut by [`jfif_without_thumbnail`]; JFXX thumbnail
/// segments go), ICC profiles and Adobe's colour transform.
fn kept_jpeg_app(marker: u8, contents: &[u8]) -> bool {
    (marker == markers::APP0 && contents.starts_with(b"JFIF\0"))
        || marker == markers::APP14
        || (marker == markers::APP2 && contents.starts_with(b"ICC_PROFILE\0"))
}

/// A JFIF header's 14 bytes, its thumbnail's size set to none and the
/// thumbnail gone.
fn jfif_without_thumbnail(contents: &[u8]) -> Option<Bytes> {
    let mut header = contents.get(..14)?.to_vec();
    header[12] = 0;
    header[13] = 0;
    Some(Bytes::from(header))
}

/// PNG chunks a picture needs: the critical ones, colour and display
/// information, and APNG's animation.
const PNG_KEPT: [&[u8; 4]; 19] = [
    b"IHDR", b"PLTE", b"IDAT", b"IEND", b"tRNS", b"cHRM", b"gAMA", b"iCCP", b"sBIT", b"sRGB",
    b"cICP", b"mDCv", b"cLLi", b"bKGD", b"pHYs", b"sPLT", b"acTL", b"fcTL", b"fdAT",
];

/// WebP chunks a picture needs.
const WEBP_KEPT: [&[u8; 4]; 7] = [
    b"VP8 ", b"VP8L", b"VP8X", b"ALPH", b"ANIM", b"ANMF", b"ICCP",
];
/// The bits of VP8X's flags that announce EXIF and XMP chunks.
const WEBP_EXIF_XMP_FLAGS: u8 = 0x08 | 0x04;

/// `bytes` of an image of `mime_type` without its metadata; refused (the
/// person may send it unchanged instead) if it is not a well-formed
/// container of that type.
pub fn strip(mime_type: &str, bytes: Vec<u8>) -> Result<Vec<u8>> {
    let mime_type = mime_type.to_owned();
    // img-parts panics on some malformed files: a panic is a refusal.
    std::panic::catch_unwind(move || strip_unguarded(&mime_type, bytes))
        .unwrap_or_else(|_| Err(unreadable()))
}

fn unreadable() -> ClientError {
    ClientError::Invalid(
        "this image could not be read to remove its metadata (where and when it was \
         taken, the camera); send it unchanged only if that may be seen"
            .into(),
    )
}

fn strip_unguarded(mime_type: &str, bytes: Vec<u8>) -> Result<Vec<u8>> {
    let bytes = Bytes::from(bytes);
    let stripped = match mime_type {
        "image/jpeg" => {
            let orientation = jpeg_orientation(&bytes);
            let mut jpeg = Jpeg::from_bytes(bytes).map_err(|_| unreadable())?;
            jpeg.segments_mut().retain(|segment| {
                let marker = segment.marker();
                let app = (markers::APP0..=markers::APP15).contains(&marker);
                marker != markers::COM && (!app || kept_jpeg_app(marker, segment.contents()))
            });
            for segment in jpeg.segments_mut() {
                if segment.marker() == markers::APP0 {
                    let header =
                        jfif_without_thumbnail(segment.contents()).ok_or_else(unreadable)?;
                    *segment = JpegSegment::new_with_contents(markers::APP0, header);
                }
            }
            if let Some(orientation) = orientation.filter(|o| (2..=8).contains(o)) {
                let segments = jpeg.segments_mut();
                let after_jfif = usize::from(
                    segments
                        .first()
                        .is_some_and(|s| s.marker() == markers::APP0),
                );
                segments.insert(
                    after_jfif,
                    JpegSegment::new_with_contents(
                        markers::APP1,
                        Bytes::from(orientation_exif(orientation)),
                    ),
                );
            }
            // img-parts keeps everything from the first scan on as it is.
            return jpeg_scans(&jpeg.encoder().bytes());
        }
        "image/png" => {
            let mut png = Png::from_bytes(bytes).map_err(|_| unreadable())?;
            png.chunks_mut()
                .retain(|chunk| PNG_KEPT.contains(&&chunk.kind()));
            png.encoder().bytes()
        }
        "image/webp" => {
            let mut webp = WebP::from_bytes(bytes).map_err(|_| unreadable())?;
            webp.chunks_mut()
                .retain(|chunk| WEBP_KEPT.contains(&&chunk.id()));
            let picture = |chunk: &img_parts::riff::RiffChunk| {
                matches!(&chunk.id(), b"VP8 " | b"VP8L" | b"ANMF")
            };
            if !webp.chunks().iter().any(picture) {
                return Err(unreadable());
            }
            for chunk in webp.chunks_mut() {
                if &chunk.id() == b"VP8X" {
                    let mut header = chunk.content().data().ok_or_else(unreadable)?.to_vec();
                    let flags = header.first_mut().ok_or_else(unreadable)?;
                    *flags &= !WEBP_EXIF_XMP_FLAGS;
                    *chunk.content_mut() = RiffContent::Data(Bytes::from(header));
                }
            }
            webp.encoder().bytes()
        }
        _ => bytes,
    };
    Ok(stripped.to_vec())
}

/// The EXIF orientation (1 to 8) of a JPEG, if it states one.
fn jpeg_orientation(jpeg: &[u8]) -> Option<u8> {
    use image::ImageDecoder;
    let mut decoder = image::codecs::jpeg::JpegDecoder::new(std::io::Cursor::new(jpeg)).ok()?;
    decoder.orientation().ok().map(|o| o.to_exif())
}

/// An APP1 EXIF block of one tag, Orientation (0x0112, a SHORT), in a
/// big-endian TIFF structure: the header, one directory of one entry, no
/// next directory.
fn orientation_exif(orientation: u8) -> Vec<u8> {
    let mut exif = b"Exif\0\0MM\0\x2a\0\0\0\x08".to_vec();
    exif.extend_from_slice(&[0, 1]); // one entry
    exif.extend_from_slice(&[0x01, 0x12, 0, 3, 0, 0, 0, 1, 0, orientation, 0, 0]);
    exif.extend_from_slice(&[0, 0, 0, 0]); // no next directory
    exif
}

/// A JPEG whose header is clean, with what follows its first scan cleaned
/// too: APPn segments and comments between scans dropped, and the file
/// cut at the end of the image. A marker that has no place there refuses
/// the image.
fn jpeg_scans(jpeg: &[u8]) -> Result<Vec<u8>> {
    let length = |at: usize| -> Result<usize> {
        let bytes = jpeg.get(at..at + 2).ok_or_else(unreadable)?;
        Ok(usize::from(u16::from_be_bytes([bytes[0], bytes[1]])))
    };
    // The header: SOI, then length-prefixed segments up to the first SOS.
    let mut at = 2;
    loop {
        if jpeg.get(at) != Some(&0xFF) {
            return Err(unreadable());
        }
        let marker = *jpeg.get(at + 1).ok_or_else(unreadable)?;
        match marker {
            0xFF => at += 1,
            0x01 | markers::RST0..=markers::RST7 => at += 2,
            markers::SOS => {
                at += 2 + length(at + 2)?;
                break;
            }
            markers::EOI => return Err(unreadable()),
            _ => at += 2 + length(at + 2)?,
        }
    }
    let mut out = jpeg.get(..at).ok_or_else(unreadable)?.to_vec();
    // Entropy-coded data, markers between scans, up to EOI.
    let mut from = at;
    while at < jpeg.len() {
        if jpeg[at] != 0xFF {
            at += 1;
            continue;
        }
        let Some(&marker) = jpeg.get(at + 1) else {
            break;
        };
        match marker {
            // A stuffed 0xFF in the data, a restart marker: data.
            0x00 | markers::RST0..=markers::RST7 => at += 2,
            // Fill before a marker.
            0xFF => at += 1,
            markers::EOI => {
                out.extend_from_slice(&jpeg[from..at + 2]);
                return Ok(out);
            }
            // Tables, restart intervals and further scans (progressive
            // JPEGs): kept.
            markers::DHT
            | markers::DQT
            | markers::DRI
            | markers::SOS
            | markers::DAC
            | markers::DNL => {
                at += 2 + length(at + 2)?;
            }
            // Metadata between scans: dropped.
            markers::APP0..=markers::APP15 | markers::COM => {
                out.extend_from_slice(&jpeg[from..at]);
                at += 2 + length(at + 2)?;
                from = at;
            }
            _ => return Err(unreadable()),
        }
    }
    // No end marker (a cut file): kept as far as it goes.
    out.extend_from_slice(jpeg.get(from..).unwrap_or_default());
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn segment(marker: u8, contents: &[u8]) -> Vec<u8> {
        let mut out = vec![0xFF, marker];
        out.extend_from_slice(&u16::try_from(contents.len() + 2).unwrap().to_be_bytes());
        out.extend_from_slice(contents);
        out
    }

    /// A JPEG's structure with metadata around a (fake) scan.
    pub(crate) fn jpeg_with_metadata() -> Vec<u8> {
        let mut jpeg = vec![0xFF, 0xD8];
        jpeg.extend(segment(0xE0, b"JFIF\0\x01\x01\0\0\x01\0\x01\0\0"));
        jpeg.extend(segment(0xE1, b"Exif\0\0GPS 52.5200N 13.4050E"));
        jpeg.extend(segment(
            0xE1,
            b"http://ns.adobe.com/xap/1.0/\0<xmp>Alice's phone</xmp>",
        ));
        jpeg.extend(segment(0xE2, b"ICC_PROFILE\0\x01\x01sRGB"));
        jpeg.extend(segment(0xFE, b"taken at home"));
        jpeg.extend(segment(0xDB, &[0; 65]));
        jpeg.extend(segment(0xDA, &[1, 1, 0, 0, 0x3F, 0]));
        jpeg.extend_from_slice(&[0x12, 0x34, 0x56, 0xFF, 0xD9]);
        jpeg
    }

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn a_photos_place_camera_and_comments_go_and_the_picture_stays() {
        let stripped = strip("image/jpeg", jpeg_with_metadata()).unwrap();
        for gone in [
            &b"GPS 52.52"[..],
            b"Alice's phone",
            b"taken at home",
            b"Exif",
        ] {
            assert!(
                !contains(&stripped, gone),
                "{}",
                String::from_utf8_lossy(gone)
            );
        }
        for kept in [
            &b"JFIF"[..],
            b"ICC_PROFILE",
            &[0x12, 0x34, 0x56, 0xFF, 0xD9],
        ] {
            assert!(contains(&stripped, kept));
        }
        assert!(stripped.starts_with(&[0xFF, 0xD8]));
        assert!(strip("image/jpeg", b"not a jpeg".to_vec()).is_err());
        assert_eq!(strip("application/pdf", b"%PDF".to_vec()).unwrap(), b"%PDF");
    }

    #[test]
    fn what_follows_the_image_and_metadata_between_scans_go() {
        // A phone's second picture after the end of the first, with its
        // own EXIF (MPF, motion photos).
        let mut with_trailer = jpeg_with_metadata();
        with_trailer.extend_from_slice(&[0xFF, 0xD8]);
        with_trailer.extend(segment(0xE1, b"Exif\0\0GPS 48.8584N"));
        with_trailer.extend_from_slice(&[0xFF, 0xD9]);
        with_trailer.extend_from_slice(b"ftypmp42 a motion photo's video");
        let stripped = strip("image/jpeg", with_trailer).unwrap();
        assert!(!contains(&stripped, b"48.8584N"));
        assert!(!contains(&stripped, b"motion photo"));
        assert!(stripped.ends_with(&[0x12, 0x34, 0x56, 0xFF, 0xD9]));

        // A progressive JPEG: tables and scans stay, an APP1 and a
        // comment between them go; stuffed bytes and restarts are data.
        let mut progressive = vec![0xFF, 0xD8];
        progressive.extend(segment(0xDB, &[0; 65]));
        progressive.extend(segment(0xDA, &[1, 1, 0, 0, 0x3F, 0]));
        progressive.extend_from_slice(&[0x11, 0xFF, 0x00, 0x22, 0xFF, 0xD0, 0x33]);
        progressive.extend(segment(0xE1, b"Exif\0\0GPS 40.7128N"));
        progressive.extend(segment(0xFE, b"between scans"));
        progressive.extend(segment(0xC4, &[0x10; 20]));
        progressive.extend(segment(0xDA, &[1, 1, 0, 0, 0x3F, 0x10]));
        progressive.extend_from_slice(&[0x44, 0xFF, 0xFF, 0xD9]);
        let stripped = strip("image/jpeg", progressive).unwrap();
        assert!(!contains(&stripped, b"40.7128N") && !contains(&stripped, b"between"));
        assert!(contains(
            &stripped,
            &[0x11, 0xFF, 0x00, 0x22, 0xFF, 0xD0, 0x33]
        ));
        assert!(contains(&stripped, &[0xFF, 0xC4, 0, 22]));
        assert!(stripped.ends_with(&[0x44, 0xFF, 0xFF, 0xD9]));

        // A frame header after the first scan has no place there.
        let mut odd = jpeg_with_metadata();
        odd.truncate(odd.len() - 2);
        odd.extend(segment(0xC0, &[8, 0, 1, 0, 1, 1, 1, 0x11, 0]));
        odd.extend_from_slice(&[0xFF, 0xD9]);
        assert!(strip("image/jpeg", odd).is_err());
    }

    #[test]
    fn a_photos_orientation_stays_alone() {
        // A real JPEG with an EXIF block: the orientation (6: turn 90°
        // clockwise) beside a description that says where it was taken.
        let picture = image::RgbImage::from_pixel(16, 8, image::Rgb([200, 10, 10]));
        let mut real = Vec::new();
        image::codecs::jpeg::JpegEncoder::new(&mut real)
            .encode_image(&picture)
            .unwrap();
        let mut tiff = b"MM\0\x2a\0\0\0\x08\0\x02".to_vec();
        tiff.extend_from_slice(&[0x01, 0x0E, 0, 2, 0, 0, 0, 16, 0, 0, 0, 38]);
        tiff.extend_from_slice(&[0x01, 0x12, 0, 3, 0, 0, 0, 1, 0, 6, 0, 0]);
        tiff.extend_from_slice(&[0, 0, 0, 0]);
        tiff.extend_from_slice(b"GPS 51.5074N\0\0\0\0");
        let mut exif = b"Exif\0\0".to_vec();
        exif.extend(tiff);
        let mut photo = real[..2].to_vec();
        photo.extend(segment(0xE1, &exif));
        photo.extend_from_slice(&real[2..]);
        assert_eq!(jpeg_orientation(&photo), Some(6));

        let stripped = strip("image/jpeg", photo).unwrap();
        assert!(!contains(&stripped, b"51.5074N"));
        assert_eq!(jpeg_orientation(&stripped), Some(6), "still turned");
        let decoded = image::load_from_memory(&stripped).unwrap();
        assert_eq!((decoded.width(), decoded.height()), (16, 8));
        // Upright photos get no EXIF at all.
        let upright = strip("image/jpeg", real.clone()).unwrap();
        assert!(!contains(&upright, b"Exif"));
    }

    #[test]
    fn a_jfif_thumbnail_goes() {
        // A JFIF header with a 1x1 thumbnail (3 bytes of RGB), and a JFXX
        // thumbnail segment.
        let mut jpeg = vec![0xFF, 0xD8];
        jpeg.extend(segment(0xE0, b"JFIF\0\x01\x02\0\0\x01\0\x01\x01\x01THN"));
        jpeg.extend(segment(0xE0, b"JFXX\0\x10uncropped original"));
        jpeg.extend(segment(0xDA, &[1, 1, 0, 0, 0x3F, 0]));
        jpeg.extend_from_slice(&[0x12, 0xFF, 0xD9]);
        let stripped = strip("image/jpeg", jpeg).unwrap();
        assert!(!contains(&stripped, b"THN") && !contains(&stripped, b"uncropped"));
        assert!(contains(&stripped, b"JFIF\0\x01\x02\0\0\x01\0\x01\0\0"));
    }

    #[test]
    fn the_type_is_read_from_the_bytes_not_the_name() {
        assert_eq!(
            sniff(&jpeg_with_metadata()),
            Sniffed::Strippable("image/jpeg")
        );
        assert_eq!(
            sniff(b"\x89PNG\r\n\x1a\n...."),
            Sniffed::Strippable("image/png")
        );
        assert_eq!(
            sniff(b"RIFF\0\0\0\0WEBPVP8 "),
            Sniffed::Strippable("image/webp")
        );
        assert!(matches!(
            sniff(b"\0\0\0\x18ftypheic\0\0\0\0mif1heic"),
            Sniffed::Unstrippable("image/heic", _)
        ));
        assert!(matches!(
            sniff(b"II*\0\x08\0\0\0"),
            Sniffed::Unstrippable("image/tiff", _)
        ));
        assert!(matches!(
            sniff(b"\0\0\0\x20ftypisom\0\0\x02\0"),
            Sniffed::Unstrippable("video/mp4", _)
        ));
        assert_eq!(
            sniff(b"\0\0\0\x20ftypM4A \0\0\x02\0"),
            Sniffed::Other,
            "audio"
        );
        assert_eq!(sniff(b"%PDF-1.7"), Sniffed::Other);
        assert_eq!(sniff(b""), Sniffed::Other);
    }

    fn riff_chunk(id: &[u8; 4], data: &[u8]) -> Vec<u8> {
        let mut out = id.to_vec();
        out.extend_from_slice(&u32::try_from(data.len()).unwrap().to_le_bytes());
        out.extend_from_slice(data);
        if data.len() % 2 == 1 {
            out.push(0);
        }
        out
    }

    fn webp(chunks: &[Vec<u8>]) -> Vec<u8> {
        let body: Vec<u8> = chunks.concat();
        let mut out = b"RIFF".to_vec();
        out.extend_from_slice(&u32::try_from(body.len() + 4).unwrap().to_le_bytes());
        out.extend_from_slice(b"WEBP");
        out.extend(body);
        out
    }

    #[test]
    fn a_webps_metadata_goes_its_header_stays_and_odd_files_are_refused() {
        // VP8X announcing alpha, EXIF and XMP; a 2x2 canvas.
        let vp8x = riff_chunk(b"VP8X", &[0x10 | 0x08 | 0x04, 0, 0, 0, 1, 0, 0, 1, 0, 0]);
        let image = webp(&[
            vp8x,
            riff_chunk(b"ALPH", &[0; 5]),
            riff_chunk(b"VP8L", &[0x2F, 1, 0, 0, 0]),
            riff_chunk(b"EXIF", b"MM\0*GPS 35.6762N"),
            riff_chunk(b"XMP ", b"<xmp>Alice</xmp>"),
            riff_chunk(b"ABCD", b"a vendor's note"),
        ]);
        let stripped = strip("image/webp", image).unwrap();
        for gone in [&b"35.6762N"[..], b"Alice", b"vendor"] {
            assert!(!contains(&stripped, gone));
        }
        let at = stripped.windows(4).position(|w| w == b"VP8X").unwrap();
        assert_eq!(stripped[at + 8], 0x10, "alpha announced, EXIF and XMP not");
        assert!(contains(&stripped, b"ALPH") && contains(&stripped, b"VP8L"));

        // An ICC profile and nothing else: img-parts would panic.
        let odd = webp(&[riff_chunk(b"ICCP", b"profile")]);
        assert!(strip("image/webp", odd).is_err());
    }

    #[test]
    fn a_pngs_text_and_exif_chunks_go() {
        fn chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
            let mut out = u32::try_from(data.len()).unwrap().to_be_bytes().to_vec();
            out.extend_from_slice(kind);
            out.extend_from_slice(data);
            let mut crc = crc32(kind);
            crc = crc32_update(crc, data);
            out.extend_from_slice(&(!crc).to_be_bytes());
            out
        }
        let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
        png.extend(chunk(b"IHDR", &[0, 0, 0, 1, 0, 0, 0, 1, 8, 0, 0, 0, 0]));
        png.extend(chunk(b"tEXt", b"Author\0Alice"));
        png.extend(chunk(b"eXIf", b"MM\0*GPS"));
        png.extend(chunk(b"caBX", b"a C2PA manifest: Alice's camera"));
        png.extend(chunk(b"IDAT", &[0x78, 0x9C, 0x63, 0, 0, 0, 1, 0, 1]));
        png.extend(chunk(b"IEND", &[]));
        let stripped = strip("image/png", png).unwrap();
        assert!(!contains(&stripped, b"Alice") && !contains(&stripped, b"GPS"));
        assert!(contains(&stripped, b"IHDR") && contains(&stripped, b"IDAT"));
    }

    fn crc32(data: &[u8]) -> u32 {
        crc32_update(0xFFFF_FFFF, data)
    }

    fn crc32_update(mut crc: u32, data: &[u8]) -> u32 {
        for byte in data {
            crc ^= u32::from(*byte);
            for _ in 0..8 {
                crc = if crc & 1 == 1 {
                    (crc >> 1) ^ 0xEDB8_8320
                } else {
                    crc >> 1
                };
            }
        }
        crc
    }
}
