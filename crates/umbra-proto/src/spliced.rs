//! A server frame encoded in pieces, so a file's bytes are never copied
//! into it.
//!
//! A `BlobData` answer is almost all file: encoding it as other frames
//! are encoded copies the chunk once into the message and once more into
//! the frame, and holds three copies of it at the peak. Here the frame is
//! the bytes before the chunk, the chunk itself (the buffer it was read
//! into) and the bytes after it; the writer sends them as WebSocket
//! fragments, and the receiver sees exactly the frame [`encode_server`]
//! makes (the tests check it byte for byte).

use bytes::Bytes;
use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len};

use crate::PROTOCOL_VERSION;
use crate::frame::{Reply, ServerMessage, encode_server};

/// `ServerFrame.response` (wire.rs).
const SERVER_FRAME_RESPONSE: u32 = 1;
/// `Response.id`.
const RESPONSE_ID: u32 = 1;
/// `Response.blob_data`.
const RESPONSE_BLOB_DATA: u32 = 21;
/// `BlobData.data`, `BlobData.size`.
const BLOB_DATA_DATA: u32 = 1;
const BLOB_DATA_SIZE: u32 = 2;

/// One encoded server frame: `head`, then `data`, then `tail` (made only
/// here, so its lengths agree).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplicedFrame {
    head: Vec<u8>,
    data: Bytes,
    tail: Vec<u8>,
}

impl SplicedFrame {
    /// The frame as it is, if it is in one piece.
    pub fn into_whole(self) -> Result<Vec<u8>, SplicedFrame> {
        if self.data.is_empty() && self.tail.is_empty() {
            Ok(self.head)
        } else {
            Err(self)
        }
    }

    /// The frame's length in bytes.
    pub fn len(&self) -> usize {
        self.head.len() + self.data.len() + self.tail.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The pieces in order, none empty.
    pub fn pieces(self) -> impl Iterator<Item = Bytes> {
        [Bytes::from(self.head), self.data, Bytes::from(self.tail)]
            .into_iter()
            .filter(|piece| !piece.is_empty())
    }

    /// The whole frame in one buffer (a copy).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.len());
        out.extend_from_slice(&self.head);
        out.extend_from_slice(&self.data);
        out.extend_from_slice(&self.tail);
        out
    }
}

impl From<Vec<u8>> for SplicedFrame {
    fn from(frame: Vec<u8>) -> Self {
        SplicedFrame {
            head: frame,
            data: Bytes::new(),
            tail: Vec::new(),
        }
    }
}

/// Encodes `message` as [`encode_server`] does; a `BlobData` answer's
/// bytes are not copied.
pub fn encode_server_spliced(message: ServerMessage) -> SplicedFrame {
    let ServerMessage::Response {
        id,
        result: Ok(Reply::BlobData { data, size }),
    } = message
    else {
        return encode_server(&message).into();
    };
    // prost's order, fields by tag, a zero (default) left out.
    let data_field = if data.is_empty() {
        0
    } else {
        key_len(BLOB_DATA_DATA) + encoded_len_varint(data.len() as u64) + data.len()
    };
    let size_field = if size == 0 {
        0
    } else {
        key_len(BLOB_DATA_SIZE) + encoded_len_varint(size)
    };
    let blob_data = data_field + size_field;
    let id_field = if id == 0 {
        0
    } else {
        key_len(RESPONSE_ID) + encoded_len_varint(id)
    };
    let response =
        id_field + key_len(RESPONSE_BLOB_DATA) + encoded_len_varint(blob_data as u64) + blob_data;

    let mut head = Vec::with_capacity(32);
    head.push(PROTOCOL_VERSION);
    encode_key(SERVER_FRAME_RESPONSE, WireType::LengthDelimited, &mut head);
    encode_varint(response as u64, &mut head);
    if id != 0 {
        encode_key(RESPONSE_ID, WireType::Varint, &mut head);
        encode_varint(id, &mut head);
    }
    encode_key(RESPONSE_BLOB_DATA, WireType::LengthDelimited, &mut head);
    encode_varint(blob_data as u64, &mut head);
    if !data.is_empty() {
        encode_key(BLOB_DATA_DATA, WireType::LengthDelimited, &mut head);
        encode_varint(data.len() as u64, &mut head);
    }
    let mut tail = Vec::new();
    if size != 0 {
        encode_key(BLOB_DATA_SIZE, WireType::Varint, &mut tail);
        encode_varint(size, &mut tail);
    }
    SplicedFrame { head, data, tail }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::frame::{ErrorReply, decode_server};
    use crate::wire::ErrorCode;

    fn blob_data(id: u64, data: Vec<u8>, size: u64) -> ServerMessage {
        ServerMessage::Response {
            id,
            result: Ok(Reply::BlobData {
                data: data.into(),
                size,
            }),
        }
    }

    #[test]
    fn a_spliced_blob_data_frame_is_the_frame_encode_server_makes() {
        // Lengths either side of each varint's byte boundaries, and the
        // zero values prost leaves out.
        for id in [0, 1, 127, 128, 1 << 40] {
            for len in [0, 1, 100, 127, 128, 16_383, 16_384, 262_144] {
                for size in [0, 1, 300, 1 << 33] {
                    let message = blob_data(id, vec![0xA5; len], size);
                    let spliced = encode_server_spliced(message.clone());
                    assert_eq!(
                        spliced.to_vec(),
                        encode_server(&message),
                        "id {id}, {len} bytes, size {size}"
                    );
                    assert_eq!(spliced.data.len(), len, "the chunk is its own piece");
                    let joined: Vec<u8> = spliced.clone().pieces().flatten().collect();
                    assert_eq!(joined, spliced.to_vec());
                    assert!(spliced.pieces().all(|piece| !piece.is_empty()));
                    assert_eq!(
                        decode_server(&encode_server_spliced(message.clone()).to_vec()).unwrap(),
                        message
                    );
                }
            }
        }
    }

    #[test]
    fn the_chunk_is_sent_from_the_buffer_it_was_read_into() {
        let read = Bytes::from(vec![7u8; 4096]);
        let spliced = encode_server_spliced(ServerMessage::Response {
            id: 9,
            result: Ok(Reply::BlobData {
                data: read.clone(),
                size: 4096,
            }),
        });
        assert_eq!(spliced.data.as_ptr(), read.as_ptr());
    }

    #[test]
    fn other_frames_are_encoded_whole() {
        let message = ServerMessage::Response {
            id: 3,
            result: Err(ErrorReply::new(ErrorCode::UnknownBlob, "no such blob")),
        };
        let spliced = encode_server_spliced(message.clone());
        assert_eq!(spliced.head, encode_server(&message));
        assert!(spliced.data.is_empty() && spliced.tail.is_empty());
        assert_eq!(spliced.pieces().count(), 1);
    }
}
