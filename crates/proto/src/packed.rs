//! Compact encodings for hash lists: postcard writes integers as varints, which makes a random
//! 128-bit hash 18-19 bytes; these write block hashes as 16 raw bytes and chunk lists as a
//! varint length plus 8 raw hash bytes. Malformed input is an error, never a panic.

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serializer};

/// `Vec<u128>` as one byte string of 16-byte little-endian values.
pub mod block_hashes {
    use super::*;

    pub fn serialize<S: Serializer>(v: &[u128], s: S) -> Result<S::Ok, S::Error> {
        let mut out = Vec::with_capacity(v.len() * 16);
        for h in v {
            out.extend_from_slice(&h.to_le_bytes());
        }
        s.serialize_bytes(&out)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u128>, D::Error> {
        let bytes = serde_bytes::ByteBuf::deserialize(d)?;
        if bytes.len() % 16 != 0 {
            return Err(D::Error::custom(
                "block hash list is not a multiple of 16 bytes",
            ));
        }
        Ok(bytes
            .chunks_exact(16)
            .map(|c| {
                let mut a = [0u8; 16];
                a.copy_from_slice(c);
                u128::from_le_bytes(a)
            })
            .collect())
    }
}

/// `Vec<(u32, u64)>` (chunk length, chunk hash) as LEB128 length + 8 hash bytes each.
pub mod chunk_list {
    use super::*;

    pub fn serialize<S: Serializer>(v: &[(u32, u64)], s: S) -> Result<S::Ok, S::Error> {
        let mut out = Vec::with_capacity(v.len() * 11);
        for (len, hash) in v {
            let mut l = *len;
            loop {
                let byte = (l & 0x7f) as u8;
                l >>= 7;
                if l == 0 {
                    out.push(byte);
                    break;
                }
                out.push(byte | 0x80);
            }
            out.extend_from_slice(&hash.to_le_bytes());
        }
        s.serialize_bytes(&out)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<(u32, u64)>, D::Error> {
        let bytes = serde_bytes::ByteBuf::deserialize(d)?;
        let mut out = Vec::new();
        let mut i = 0;
        while i < bytes.len() {
            let mut len: u64 = 0;
            let mut shift = 0;
            loop {
                let b = *bytes
                    .get(i)
                    .ok_or_else(|| D::Error::custom("truncated chunk length"))?;
                i += 1;
                len |= u64::from(b & 0x7f) << shift;
                if b & 0x80 == 0 {
                    break;
                }
                shift += 7;
                if shift > 28 {
                    return Err(D::Error::custom("chunk length does not fit 32 bits"));
                }
            }
            let len = u32::try_from(len)
                .map_err(|_| D::Error::custom("chunk length does not fit 32 bits"))?;
            let h = bytes
                .get(i..i + 8)
                .ok_or_else(|| D::Error::custom("truncated chunk hash"))?;
            let mut a = [0u8; 8];
            a.copy_from_slice(h);
            out.push((len, u64::from_le_bytes(a)));
            i += 8;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use crate::{Msg, Signature};
    use proptest::prelude::*;

    /// Postcard bytes of `value` with its last field, an empty byte string, replaced by `data`.
    fn carrying<T: serde::Serialize>(value: &T, data: &[u8]) -> Vec<u8> {
        let mut bytes = postcard::to_allocvec(value).unwrap();
        assert_eq!(bytes.pop(), Some(0), "last field is an empty byte string");
        let mut n = data.len();
        loop {
            let b = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                bytes.push(b);
                break;
            }
            bytes.push(b | 0x80);
        }
        bytes.extend_from_slice(data);
        bytes
    }

    proptest! {
        #![proptest_config(ProptestConfig { failure_persistence: None, ..Default::default() })]

        /// Arbitrary bytes as a packed list: a list of the size the bytes allow, or an error;
        /// what decodes encodes back to an equal value.
        #[test]
        fn arbitrary_packed_lists_decode_or_fail(
            data in proptest::collection::vec(any::<u8>(), 0..600),
        ) {
            let empty = Msg::Hashes { id: 5, block: 4096, hashes: vec![] };
            match postcard::from_bytes::<Msg>(&carrying(&empty, &data)) {
                Ok(m) => {
                    let Msg::Hashes { hashes, .. } = &m else {
                        return Err(TestCaseError::fail(format!("decoded as {m:?}")));
                    };
                    prop_assert_eq!(hashes.len() * 16, data.len());
                    let again = postcard::to_allocvec(&m).unwrap();
                    prop_assert_eq!(postcard::from_bytes::<Msg>(&again).unwrap(), m);
                }
                Err(_) => prop_assert!(data.len() % 16 != 0),
            }

            let empty = Signature::Chunks { basis_size: 1, avg: 8192, chunks: vec![] };
            if let Ok(s) = postcard::from_bytes::<Signature>(&carrying(&empty, &data)) {
                let Signature::Chunks { chunks, .. } = &s else {
                    return Err(TestCaseError::fail(format!("decoded as {s:?}")));
                };
                // 1-5 length bytes and 8 hash bytes per chunk.
                prop_assert!(chunks.len() * 9 <= data.len() && data.len() <= chunks.len() * 13);
                let again = postcard::to_allocvec(&s).unwrap();
                prop_assert_eq!(postcard::from_bytes::<Signature>(&again).unwrap(), s);
            }
        }
    }

    #[test]
    fn hash_lists_round_trip_compactly() {
        let hashes: Vec<u128> = (0..100u128)
            .map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c834))
            .collect();
        let m = Msg::Hashes {
            id: 1,
            block: 4096,
            hashes: hashes.clone(),
        };
        let bytes = postcard::to_allocvec(&m).unwrap();
        assert!(bytes.len() <= 100 * 16 + 16, "{} bytes", bytes.len());
        assert_eq!(postcard::from_bytes::<Msg>(&bytes).unwrap(), m);

        let chunks: Vec<(u32, u64)> = (0..100u64)
            .map(|i| (8000 + i as u32, i.wrapping_mul(0x9e37_79b9_7f4a_7c15)))
            .collect();
        let s = Msg::Signature {
            id: 2,
            signature: Signature::Chunks {
                basis_size: 9,
                avg: 8192,
                chunks,
            },
        };
        let bytes = postcard::to_allocvec(&s).unwrap();
        assert!(bytes.len() <= 100 * 10 + 16, "{} bytes", bytes.len());
        assert_eq!(postcard::from_bytes::<Msg>(&bytes).unwrap(), s);
    }

    #[test]
    fn malformed_hash_lists_are_errors() {
        // Hashes { id: 1, block: 1, hashes: 3 bytes } — not a multiple of 16.
        let m = Msg::Hashes {
            id: 1,
            block: 1,
            hashes: vec![],
        };
        let mut bytes = postcard::to_allocvec(&m).unwrap();
        let last = bytes.len() - 1;
        bytes[last] = 3;
        bytes.extend_from_slice(&[1, 2, 3]);
        assert!(postcard::from_bytes::<Msg>(&bytes).is_err());
    }
}
