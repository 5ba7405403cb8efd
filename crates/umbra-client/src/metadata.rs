//! What cameras and editors write into images besides the picture: EXIF
//! (the place and time a photo was taken, the phone that took it), XMP,
//! comments and text chunks. Stripped before an image is sealed, unless
//! the person asks to keep it, by rewriting the container's segments
//! (`img-parts`) without decoding or re-encoding the picture.
//!
//! JPEG: every APPn segment goes but APP0 (JFIF), APP2 ICC profiles
//! (colours) and APP14 (Adobe: needed to decode some colour spaces), and
//! every comment; what follows the first scan is left as it is (cameras
//! write nothing there). PNG: `eXIf`, `tEXt`, `zTXt`, `iTXt` and `tIME`
//! go. WebP: its `EXIF` and `XMP ` chunks go. A photo's EXIF orientation
//! goes with the rest (a rotated photo may show on its side).

use img_parts::jpeg::{Jpeg, markers};
use img_parts::png::Png;
use img_parts::webp::WebP;
use img_parts::{Bytes, ImageEXIF};

use crate::error::{ClientError, Result};

/// The image formats whose metadata is stripped, by MIME type.
pub fn strips(mime_type: &str) -> bool {
    matches!(mime_type, "image/jpeg" | "image/png" | "image/webp")
}

/// `bytes` of an image of `mime_type` without its metadata; refused (the
/// person may send it unchanged instead) if it is not a well-formed
/// container of that type.
pub fn strip(mime_type: &str, bytes: Vec<u8>) -> Result<Vec<u8>> {
    let unreadable = |_| {
        ClientError::Invalid(
            "this image could not be read to remove its metadata (where and when it was \
             taken, the camera); send it unchanged only if that may be seen"
                .into(),
        )
    };
    let bytes = Bytes::from(bytes);
    let stripped = match mime_type {
        "image/jpeg" => {
            let mut jpeg = Jpeg::from_bytes(bytes).map_err(unreadable)?;
            jpeg.segments_mut().retain(|segment| {
                let marker = segment.marker();
                let app = (markers::APP0..=markers::APP15).contains(&marker);
                let icc =
                    marker == markers::APP2 && segment.contents().starts_with(b"ICC_PROFILE\0");
                let kept_app = marker == markers::APP0 || icc || marker == markers::APP14;
                marker != markers::COM && (!app || kept_app)
            });
            jpeg.encoder().bytes()
        }
        "image/png" => {
            let mut png = Png::from_bytes(bytes).map_err(unreadable)?;
            png.chunks_mut().retain(|chunk| {
                !matches!(
                    &chunk.kind(),
                    b"eXIf" | b"tEXt" | b"zTXt" | b"iTXt" | b"tIME"
                )
            });
            png.encoder().bytes()
        }
        "image/webp" => {
            let mut webp = WebP::from_bytes(bytes).map_err(unreadable)?;
            webp.set_exif(None);
            webp.remove_chunks_by_id(*b"XMP ");
            webp.encoder().bytes()
        }
        _ => bytes,
    };
    Ok(stripped.to_vec())
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
