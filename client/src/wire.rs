//! Framing shared by every Aspen protocol: a 4-byte big-endian length, then postcard bytes.
//!
//! The length is checked against the protocol's maximum BEFORE anything is allocated, and the
//! body buffer grows only as bytes actually arrive: a peer that declares a huge frame and
//! then sends nothing costs a few KiB, not the declared length.

use serde::{de::DeserializeOwned, Serialize};

/// Buffer reserved before the first body byte arrives.
const FIRST_READ: usize = 4096;
/// Most bytes taken from the stream per read.
const READ_CHUNK: usize = 1024 * 1024;

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("stream ended before a complete frame")]
    Truncated,
    #[error("undecodable frame: {0}")]
    Decode(#[from] postcard::Error),
    #[error("stream read failed: {0}")]
    Read(String),
    #[error("stream reset by the peer with code {0}")]
    Reset(u64),
    #[error("stream write failed: {0}")]
    Write(String),
}

/// Encodes a value as one frame (length prefix included).
pub fn encode_frame<T: Serialize>(value: &T, max: usize) -> Result<Vec<u8>, FrameError> {
    let body = postcard::to_allocvec(value)?;
    if body.len() > max {
        return Err(FrameError::TooLarge {
            len: body.len(),
            max,
        });
    }
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(&body);
    Ok(frame)
}

/// Decodes a frame body (without its length prefix), refusing trailing bytes.
pub fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    let (value, rest) = postcard::take_from_bytes(body)?;
    if !rest.is_empty() {
        return Err(FrameError::Decode(postcard::Error::DeserializeBadEncoding));
    }
    Ok(value)
}

/// Writes one frame to an iroh stream.
pub async fn write_frame<T: Serialize>(
    send: &mut iroh::endpoint::SendStream,
    value: &T,
    max: usize,
) -> Result<(), FrameError> {
    let frame = encode_frame(value, max)?;
    send.write_all(&frame)
        .await
        .map_err(|e| FrameError::Write(e.to_string()))
}

/// Reads one frame from an iroh stream, checking the length before allocating.
pub async fn read_frame<T: DeserializeOwned>(
    recv: &mut iroh::endpoint::RecvStream,
    max: usize,
) -> Result<T, FrameError> {
    use iroh::endpoint::ReadExactError;
    let mut len = [0u8; 4];
    recv.read_exact(&mut len).await.map_err(|e| match e {
        ReadExactError::FinishedEarly(_) => FrameError::Truncated,
        ReadExactError::ReadError(e) => read_error(e),
    })?;
    let len = u32::from_be_bytes(len) as usize;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    let mut body = Vec::with_capacity(len.min(FIRST_READ));
    while body.len() < len {
        let want = (len - body.len()).min(READ_CHUNK);
        match recv.read_chunk(want).await {
            Ok(Some(bytes)) => body.extend_from_slice(&bytes),
            Ok(None) => return Err(FrameError::Truncated),
            Err(e) => return Err(read_error(e)),
        }
    }
    decode_body(&body)
}

fn read_error(e: iroh::endpoint::ReadError) -> FrameError {
    match e {
        iroh::endpoint::ReadError::Reset(code) => FrameError::Reset(code.into_inner()),
        e => FrameError::Read(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_limits_hold() {
        let v = (1u32, "hello".to_string(), vec![1u8, 2, 3]);
        let f = encode_frame(&v, 1024).unwrap();
        assert_eq!(
            u32::from_be_bytes(f[..4].try_into().unwrap()) as usize,
            f.len() - 4
        );
        let back: (u32, String, Vec<u8>) = decode_body(&f[4..]).unwrap();
        assert_eq!(back, v);
        assert!(matches!(
            encode_frame(&vec![0u8; 100], 10),
            Err(FrameError::TooLarge { .. })
        ));
        let mut trailing = f[4..].to_vec();
        trailing.push(0);
        assert!(decode_body::<(u32, String, Vec<u8>)>(&trailing).is_err());
    }
}
