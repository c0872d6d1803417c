//! Intermediate keys (directory key mode, docs/FORMAT.md section 7): how a
//! header names the intermediate key (IK) its DEK is wrapped under, and the
//! object in the backing directory that holds the IK wrapped by the KMS.
//! Pure code, no I/O, no crypto: the object is authenticated by the KMS
//! unwrap, which is bound to the IK's ID and the volume.
//!
//! ```text
//! header key version = <KMS key version> "+ik." <32 lowercase hex: IK ID>
//! IK ID (16)         = creation time, Unix seconds, u64 BE (8) | random (8)
//! object             = magic "KMSFSIK\0" (8) | version u16 (1) | IK ID (16)
//!                      | wrap (the header's wrap encoding: the IK as the
//!                        KMS wrapped it, under the policy's key)
//! ```

use super::header::{put_wrap, take_wrap, WrappedDek};
use super::FormatError;

pub const MAGIC: &[u8; 8] = b"KMSFSIK\0";
pub const VERSION: u16 = 1;
/// Length of an IK's ID.
pub const ID_LEN: usize = 16;
/// Objects are a few hundred bytes; anything larger is not one of ours.
pub const MAX_OBJECT_LEN: usize = 4096;
/// What separates the KMS key version from the IK ID in a header's key
/// version.
pub const VERSION_MARK: &str = "+ik.";
/// Length of the `+ik.<hex>` suffix.
pub const SUFFIX_LEN: usize = VERSION_MARK.len() + 2 * ID_LEN;

/// An IK's ID from exactly 32 lowercase hex digits; None for anything else
/// (it names a file in the backing directory: no other spelling passes).
pub fn parse_id(hex_id: &str) -> Option<[u8; ID_LEN]> {
    if hex_id.len() != 2 * ID_LEN
        || !hex_id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return None;
    }
    let mut id = [0u8; ID_LEN];
    hex::decode_to_slice(hex_id, &mut id).ok()?;
    Some(id)
}

/// A header's key version split into the KMS key version and, if the DEK
/// is wrapped under an IK, the IK's ID; `Err` for a version that has the
/// IK mark but no valid ID after it (refused, never guessed at).
pub fn split_version(key_version: &str) -> Result<(&str, Option<[u8; ID_LEN]>), FormatError> {
    match key_version.rsplit_once(VERSION_MARK) {
        None => Ok((key_version, None)),
        Some((base, id)) => match parse_id(id) {
            Some(id) => Ok((base, Some(id))),
            None => Err(FormatError::IkObject(
                "a key version names an intermediate key ID that is not 32 lowercase hex digits",
            )),
        },
    }
}

/// The KMS key version of a header's key version (the IK suffix stripped):
/// what key rotation and `keys status` compare.
pub fn base_version(key_version: &str) -> &str {
    match split_version(key_version) {
        Ok((base, _)) => base,
        Err(_) => key_version,
    }
}

/// The key version a header records for a DEK wrapped under IK `id`, whose
/// own wrap is at KMS key version `base`.
pub fn ik_version(base: &str, id: &[u8; ID_LEN]) -> String {
    format!("{base}{VERSION_MARK}{}", hex::encode(id))
}

/// The bytes of the object of IK `id`, wrapped as `wrapped`.
pub fn encode_object(id: &[u8; ID_LEN], wrapped: &WrappedDek) -> Result<Vec<u8>, FormatError> {
    let mut out = Vec::with_capacity(128 + wrapped.blob.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_be_bytes());
    out.extend_from_slice(id);
    put_wrap(&mut out, wrapped)?;
    if out.len() > MAX_OBJECT_LEN {
        return Err(FormatError::FieldTooLong("intermediate key object"));
    }
    Ok(out)
}

/// Parses the object that should hold IK `id`: structure only, and that it
/// says it is `id`'s. Not authenticated: the KMS unwrap is.
pub fn parse_object(bytes: &[u8], id: &[u8; ID_LEN]) -> Result<WrappedDek, FormatError> {
    if bytes.len() > MAX_OBJECT_LEN {
        return Err(FormatError::IkObject("larger than 4096 bytes"));
    }
    let fixed = MAGIC.len() + 2 + ID_LEN;
    if bytes.len() < fixed {
        return Err(FormatError::Truncated);
    }
    if &bytes[..MAGIC.len()] != MAGIC {
        return Err(FormatError::IkObject("bad magic"));
    }
    let version = u16::from_be_bytes([bytes[8], bytes[9]]);
    if version != VERSION {
        return Err(FormatError::UnsupportedVersion(version, VERSION));
    }
    if &bytes[10..fixed] != id {
        return Err(FormatError::IkObject(
            "it holds another intermediate key than its name says",
        ));
    }
    let (wrapped, rest) = take_wrap(&bytes[fixed..])?;
    if !rest.is_empty() {
        return Err(FormatError::TrailingBytes(rest.len()));
    }
    Ok(wrapped)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::KeyRef;

    fn sample() -> WrappedDek {
        WrappedDek {
            key_ref: KeyRef {
                provider: "kms".into(),
                key_id: "k".into(),
                key_version: "3".into(),
            },
            blob: vec![0xaa, 0xbb],
        }
    }

    /// The layout of docs/FORMAT.md section 7, byte for byte.
    #[test]
    fn object_matches_the_fixed_vector() {
        let id = [0x11; 16];
        let bytes = encode_object(&id, &sample()).unwrap();
        let mut expected = b"KMSFSIK\0\x00\x01".to_vec();
        expected.extend_from_slice(&[0x11; 16]);
        expected.extend_from_slice(b"\x03kms\x00\x01k\x013\x00\x02\xaa\xbb");
        assert_eq!(bytes, expected);
        assert_eq!(parse_object(&bytes, &id).unwrap(), sample());
    }

    #[test]
    fn bad_objects_are_refused() {
        let id = [0x11; 16];
        let good = encode_object(&id, &sample()).unwrap();
        assert!(parse_object(&good, &[0x22; 16]).is_err(), "another ID");
        for n in 0..good.len() {
            assert!(parse_object(&good[..n], &id).is_err(), "truncated at {n}");
        }
        let mut trailing = good.clone();
        trailing.push(0);
        assert_eq!(
            parse_object(&trailing, &id),
            Err(FormatError::TrailingBytes(1))
        );
        let mut magic = good.clone();
        magic[0] ^= 1;
        assert!(parse_object(&magic, &id).is_err());
        let mut version = good;
        version[9] = 2;
        assert!(parse_object(&version, &id).is_err());
        assert!(parse_object(&vec![0; MAX_OBJECT_LEN + 1], &id).is_err());
    }

    #[test]
    fn key_versions_with_and_without_an_ik() {
        let id = [0xab; 16];
        let v = ik_version("7", &id);
        assert_eq!(v.len(), 1 + SUFFIX_LEN);
        assert_eq!(split_version(&v).unwrap(), ("7", Some(id)));
        assert_eq!(split_version("7").unwrap(), ("7", None));
        assert_eq!(split_version("").unwrap(), ("", None));
        assert_eq!(base_version(&v), "7");
        assert_eq!(base_version("7"), "7");
        for bad in [
            "7+ik.",
            "7+ik.AB",
            &format!("7+ik.{}", "AB".repeat(16)),
            &format!("{v}0"),
            "7+ik.../../../etc/passwd000000000000",
        ] {
            assert!(split_version(bad).is_err(), "{bad}");
        }
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
            let _ = parse_object(&bytes, &[0; 16]);
        }
    }
}
