//! A photo's thumbnail: made on the sender's device (decoded, turned the
//! way its camera said, shrunk, encoded as a small JPEG) and carried
//! inside the MLS message, so a recipient sees what a photo is before it
//! fetches it; and read back, with tight limits, since it comes from
//! someone else. Both with the `image` crate; nothing here parses image
//! formats itself.

use std::io::Cursor;

use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, Limits};
use umbra_proto::content::MAX_THUMBNAIL_BYTES;

/// The longest side of a thumbnail, in pixels.
pub const THUMBNAIL_SIDE: u32 = 96;

/// The largest photo a thumbnail is made from (pixels on a side, and
/// bytes the decoder may allocate): a decompression bomb is refused, not
/// decoded.
const MAX_SIDE: u32 = 20_000;
const MAX_ALLOC: u64 = 512 * 1024 * 1024;

/// A picture for a terminal: `width` × `height` RGB pixels, row by row.
#[derive(Clone, PartialEq, Eq)]
pub struct Picture {
    pub width: u32,
    pub height: u32,
    pub pixels: Vec<[u8; 3]>,
}

impl std::fmt::Debug for Picture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Picture({}x{})", self.width, self.height)
    }
}

impl Picture {
    /// The pixel at (`x`, `y`), black outside.
    pub fn at(&self, x: u32, y: u32) -> [u8; 3] {
        if x >= self.width || y >= self.height {
            return [0; 3];
        }
        let index = usize::try_from(u64::from(y) * u64::from(self.width) + u64::from(x))
            .unwrap_or(usize::MAX);
        self.pixels.get(index).copied().unwrap_or([0; 3])
    }
}

fn decode(
    bytes: &[u8],
    format: Option<ImageFormat>,
    side: u32,
    alloc: u64,
) -> Option<DynamicImage> {
    let mut reader = ImageReader::new(Cursor::new(bytes));
    match format {
        Some(format) => reader.set_format(format),
        None => reader = reader.with_guessed_format().ok()?,
    }
    let mut limits = Limits::default();
    limits.max_image_width = Some(side);
    limits.max_image_height = Some(side);
    limits.max_alloc = Some(alloc);
    reader.limits(limits);
    let mut decoder = reader.into_decoder().ok()?;
    // `image` enforces `max_alloc` only in `ImageReader::decode`: checked
    // here, for the picture and the copy turning it may make.
    if decoder.total_bytes().saturating_mul(2) > alloc {
        return None;
    }
    let orientation = decoder.orientation().ok()?;
    let mut image = DynamicImage::from_decoder(decoder).ok()?;
    image.apply_orientation(orientation);
    Some(image)
}

/// A JPEG thumbnail of the photo `original` (JPEG or PNG), turned as its
/// camera said; `None` if it cannot be decoded (the photo is sent all the
/// same, without one).
pub fn make(original: &[u8]) -> Option<Vec<u8>> {
    let image = decode(original, None, MAX_SIDE, MAX_ALLOC)?;
    let small = image.thumbnail(THUMBNAIL_SIDE, THUMBNAIL_SIDE).to_rgb8();
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 70)
        .encode_image(&small)
        .ok()?;
    (out.len() <= MAX_THUMBNAIL_BYTES).then_some(out)
}

/// The longest side a photo is drawn at in the terminal (a terminal
/// window is rarely wider than this in pixels).
pub const PHOTO_SIDE: u32 = 1600;

/// A received photo's limits: pixels on a side, and bytes the decoder
/// may allocate (a 40-megapixel photo fits; a bomb does not).
const RECEIVED_SIDE: u32 = 16_384;
const RECEIVED_ALLOC: u64 = 256 * 1024 * 1024;

/// A whole photo (JPEG or PNG, someone else's bytes: decoded within
/// tighter limits than one's own photos), turned as its camera said and
/// shrunk to fit [`PHOTO_SIDE`]; `None` if it cannot be decoded.
pub fn photo(bytes: &[u8]) -> Option<DynamicImage> {
    let image = decode(bytes, None, RECEIVED_SIDE, RECEIVED_ALLOC)?;
    Some(
        if image.width() > PHOTO_SIDE || image.height() > PHOTO_SIDE {
            image.thumbnail(PHOTO_SIDE, PHOTO_SIDE)
        } else {
            image
        },
    )
}

/// A received thumbnail (someone else's bytes: a JPEG of at most 256
/// pixels a side, decoded within a megabyte), scaled to fit `width` ×
/// `height`; `None` if it is not one.
pub fn picture(thumbnail: &[u8], width: u32, height: u32) -> Option<Picture> {
    let image = decode(thumbnail, Some(ImageFormat::Jpeg), 256, 1 << 20)?;
    let fitted = image.thumbnail(width.max(1), height.max(1)).to_rgb8();
    Some(Picture {
        width: fitted.width(),
        height: fitted.height(),
        pixels: fitted.pixels().map(|p| p.0).collect(),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A photo, 400 × 200, left half red, right half blue.
    pub(crate) fn photo() -> Vec<u8> {
        let image = image::RgbImage::from_fn(400, 200, |x, _| {
            if x < 200 {
                image::Rgb([255, 0, 0])
            } else {
                image::Rgb([0, 0, 255])
            }
        });
        let mut out = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90)
            .encode_image(&image)
            .unwrap();
        out
    }

    #[test]
    fn a_picture_larger_than_the_memory_allowed_is_not_decoded() {
        // 1000 × 1000 RGB: 3 MB decoded, within the sides allowed.
        let image = image::RgbImage::from_pixel(1000, 1000, image::Rgb([9, 9, 9]));
        let mut png = Vec::new();
        image
            .write_to(&mut Cursor::new(&mut png), ImageFormat::Png)
            .unwrap();
        assert!(png.len() < 100_000, "it compresses to little");
        assert!(decode(&png, None, 20_000, 1 << 20).is_none());
        assert!(decode(&png, None, 20_000, 8 << 20).is_some());
    }

    #[test]
    fn a_photo_gets_a_small_thumbnail_that_reads_back() {
        let thumbnail = make(&photo()).unwrap();
        assert!(thumbnail.len() < 8 * 1024, "{}", thumbnail.len());
        let picture = picture(&thumbnail, 40, 40).unwrap();
        assert_eq!((picture.width, picture.height), (40, 20));
        let [r, _, b] = picture.at(5, 10);
        assert!(r > 200 && b < 60, "left is red");
        let [r, _, b] = picture.at(35, 10);
        assert!(b > 200 && r < 60, "right is blue");
        assert_eq!(picture.at(99, 99), [0; 3]);
    }

    #[test]
    fn what_is_not_a_small_jpeg_is_not_drawn() {
        assert!(make(b"not an image").is_none());
        assert!(picture(b"\xFF\xD8 broken", 10, 10).is_none());
        // A real JPEG, but larger than a thumbnail may be.
        let big = image::RgbImage::from_pixel(300, 10, image::Rgb([1, 2, 3]));
        let mut out = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 50)
            .encode_image(&big)
            .unwrap();
        assert!(picture(&out, 10, 10).is_none());
    }
}
