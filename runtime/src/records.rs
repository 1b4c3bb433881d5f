//! Typed, versioned records: what an application stores in work units and tables.
//!
//! A record is a `#[repr(C)]` zerocopy struct implementing [`Record`]. Its fields are only
//! ever appended (SBE-style); each layout version is a prefix of the struct. One id space:
//! [`Record::TYPE_ID`] is at once the template id declared in [`crate::Application::templates`]
//! (with [`TemplateInfo::of`]), the kind of a work unit holding the record, and the table a
//! table record of that type lives in.
//!
//! - [`crate::Tx::register_record`] / [`crate::Tx::update_record`] write a unit, and
//!   [`crate::Tx::put_record`] a table record, in the layout version the two engines agreed on
//!   ([`crate::Tx::write_version`]: the oldest one, unless an enabled feature needs a newer
//!   one) — a new engine whose features are off writes what the old engine reads;
//! - [`crate::Tx::unit_record`] and [`crate::Tx::get_record`] read one back whichever
//!   version wrote it: fields the writer did not know read as [`Record::defaults`], fields
//!   the reader does not know are skipped. The value is copied out of the store (a `Copy`
//!   struct on the stack, no allocation).
//!
//! A table record is stored as a 4-byte header (type id, layout version; little-endian `u16`
//! each) followed by the record's block; [`decode_table_value`] reads one (on a standby, in
//! [`crate::Application::on_apply`]). A unit's kind and layout version are in the unit itself;
//! [`decode_unit`] reads it.
//!
//! # Examples
//!
//! ```
//! use understudy_runtime::records::{Record, TemplateInfo};
//! use understudy_runtime::zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};
//!
//! /// A call: version 1 has the first two fields, version 2 appends `max_secs`.
//! #[derive(FromBytes, IntoBytes, Immutable, KnownLayout, Clone, Copy, Debug, PartialEq)]
//! #[repr(C)]
//! struct Call {
//!     caller: u64,
//!     started_ns: u64,
//!     max_secs: u64, // since v2; 0 = no limit
//! }
//!
//! impl Record for Call {
//!     const TYPE_ID: u16 = 1;
//!     const NAME: &'static str = "call";
//!     const VERSIONS: &'static [(u16, u16)] = &[(1, 16), (2, 24)];
//!     fn defaults() -> Self {
//!         Call { caller: 0, started_ns: 0, max_secs: 0 }
//!     }
//! }
//! understudy_runtime::assert_record_layout!(Call);
//!
//! let t = TemplateInfo::of::<Call>();
//! assert_eq!((t.type_id, t.min_version, t.max_version), (1, 1, 2));
//! ```

use crate::store::UnitRef;
pub use shm_layout::record::{
    block_length, decode, encode, encoded, latest_version, oldest_version, version_at_most, Record,
    RecordError, TemplateInfo,
};

/// Bytes before the block in a typed table record: type id and layout version.
pub const TABLE_HEADER: usize = 4;

/// The version of `R` to write when the engines agreed to write template `R::TYPE_ID` in
/// `agreed`: the newest of `R`'s versions not newer than that (its oldest if none is).
pub fn write_version_of<R: Record>(agreed: u16) -> u16 {
    version_at_most::<R>(agreed).unwrap_or_else(oldest_version::<R>)
}

fn block_of(len: usize) -> u16 {
    // A block longer than any struct we know is read as its prefix: the rest are fields of a
    // newer version, skipped.
    u16::try_from(len).unwrap_or(u16::MAX)
}

/// Read the record a unit holds; any layout version of `R` (older: defaults filled; newer:
/// unknown fields skipped). A unit of another kind is [`RecordError::WrongType`].
pub fn decode_unit<R: Record>(unit: UnitRef<'_>) -> Result<R, RecordError> {
    if unit.kind != R::TYPE_ID {
        return Err(RecordError::WrongType {
            record: R::NAME,
            expected: R::TYPE_ID,
            found: unit.kind,
        });
    }
    shm_layout::record::decode(unit.state, block_of(unit.state.len()))
}

/// Append `rec` as a typed table value written in layout `version` to `out` (cleared first).
pub fn encode_table_value<R: Record>(
    rec: &R,
    version: u16,
    out: &mut Vec<u8>,
) -> Result<(), RecordError> {
    let block = encoded(rec, version)?;
    out.clear();
    out.extend_from_slice(&R::TYPE_ID.to_le_bytes());
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(block);
    Ok(())
}

/// The type id and layout version of a typed table value, and its block.
pub fn table_value_parts(value: &[u8]) -> Result<(u16, u16, &[u8]), RecordError> {
    if value.len() < TABLE_HEADER {
        return Err(RecordError::Truncated {
            record: "table record header",
            block_length: TABLE_HEADER as u16,
            found: value.len(),
        });
    }
    let type_id = u16::from_le_bytes([value[0], value[1]]);
    let version = u16::from_le_bytes([value[2], value[3]]);
    Ok((type_id, version, &value[TABLE_HEADER..]))
}

/// Read a typed table value written by [`crate::Tx::put_record`] (any layout version of `R`).
pub fn decode_table_value<R: Record>(value: &[u8]) -> Result<R, RecordError> {
    let (type_id, _version, block) = table_value_parts(value)?;
    if type_id != R::TYPE_ID {
        return Err(RecordError::WrongType {
            record: R::NAME,
            expected: R::TYPE_ID,
            found: type_id,
        });
    }
    shm_layout::record::decode(block, block_of(block.len()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::app::Tx;
    use crate::store::Store;
    use proptest::prelude::*;
    use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

    /// Version 1 of a template, as an old build declares it.
    #[derive(FromBytes, IntoBytes, Immutable, KnownLayout, Clone, Copy, Debug, PartialEq)]
    #[repr(C)]
    struct CallV1 {
        caller: u64,
        started: u64,
    }
    impl Record for CallV1 {
        const TYPE_ID: u16 = 7;
        const NAME: &'static str = "call";
        const VERSIONS: &'static [(u16, u16)] = &[(1, 16)];
        fn defaults() -> Self {
            CallV1 {
                caller: 0,
                started: 0,
            }
        }
    }
    crate::assert_record_layout!(CallV1);

    /// The same template in a new build: version 2 appends `limit`.
    #[derive(FromBytes, IntoBytes, Immutable, KnownLayout, Clone, Copy, Debug, PartialEq)]
    #[repr(C)]
    struct CallV2 {
        caller: u64,
        started: u64,
        limit: u64,
    }
    impl Record for CallV2 {
        const TYPE_ID: u16 = 7;
        const NAME: &'static str = "call";
        const VERSIONS: &'static [(u16, u16)] = &[(1, 16), (2, 24)];
        fn defaults() -> Self {
            CallV2 {
                caller: 0,
                started: 0,
                limit: 3600,
            }
        }
    }
    crate::assert_record_layout!(CallV2);

    /// Runs `f` in a transaction over `store` writing template 7 as `version`, then commits
    /// its changes to `store`.
    fn in_tx(store: &mut Store, version: u16, f: impl FnOnce(&mut Tx<'_>)) {
        let mut bufs = crate::engine::TxBuffers::new();
        let wv = [(7u16, version)];
        {
            let mut tx = Tx {
                store,
                bufs: &mut bufs,
                enabled: 0,
                write_versions: &wv,
            };
            f(&mut tx);
        }
        for op in &bufs.ops {
            store.apply(op);
        }
    }

    fn read<R: Record>(store: &mut Store, id: u64) -> (R, R) {
        let mut out = None;
        in_tx(store, 1, |tx| {
            let u = tx.unit_record::<R>(id).unwrap().expect("unit");
            let t = tx
                .get_record::<R>(&id.to_le_bytes())
                .unwrap()
                .expect("record");
            out = Some((u, t));
        });
        out.unwrap()
    }

    proptest! {
        /// A v1 writer, a v2 reader: the appended field reads as its default.
        #[test]
        fn v1_writer_v2_reader(id: u64, caller: u64, started: u64) {
            let mut store = Store::new();
            let v1 = CallV1 { caller, started };
            in_tx(&mut store, 1, |tx| {
                tx.register_record(id, &v1);
                tx.put_record(&id.to_le_bytes(), &v1);
                // Read back inside the same transaction, too.
                assert_eq!(tx.unit_record::<CallV1>(id).unwrap(), Some(v1));
            });
            let want = CallV2 { caller, started, limit: 3600 };
            prop_assert_eq!(read::<CallV2>(&mut store, id), (want, want));
            prop_assert_eq!(store.unit(id).unwrap().layout_version, 1);
        }

        /// A v2 writer told to write v1 (its feature off), a v1 reader; and a v2 writer
        /// writing v2, read by v1 (skips the new field) and by v2 (sees it).
        #[test]
        fn v2_writer_v1_reader(id: u64, caller: u64, started: u64, limit: u64) {
            let mut store = Store::new();
            let v2 = CallV2 { caller, started, limit };
            in_tx(&mut store, 1, |tx| {
                tx.register_record(id, &v2);
                tx.put_record(&id.to_le_bytes(), &v2);
            });
            prop_assert_eq!(store.unit(id).unwrap().state.len(), 16);
            let v1 = CallV1 { caller, started };
            prop_assert_eq!(read::<CallV1>(&mut store, id), (v1, v1));
            let defaulted = CallV2 { caller, started, limit: 3600 };
            prop_assert_eq!(read::<CallV2>(&mut store, id), (defaulted, defaulted));

            in_tx(&mut store, 2, |tx| {
                tx.update_record(id, &v2);
                tx.put_record(&id.to_le_bytes(), &v2);
            });
            prop_assert_eq!(store.unit(id).unwrap().layout_version, 2);
            prop_assert_eq!(read::<CallV1>(&mut store, id), (v1, v1));
            prop_assert_eq!(read::<CallV2>(&mut store, id), (v2, v2));
        }

        /// Any bytes in a table value or unit: a typed error or a value, never a panic.
        #[test]
        fn untrusted_bytes(value in proptest::collection::vec(any::<u8>(), 0..40), kind: u16) {
            let _ = decode_table_value::<CallV2>(&value);
            let _ = decode_unit::<CallV2>(UnitRef { kind, layout_version: 1, state: &value });
        }
    }

    #[test]
    fn wrong_type_is_named() {
        let mut v = Vec::new();
        encode_table_value(&CallV1::defaults(), 1, &mut v).unwrap();
        v[0] = 9;
        let e = decode_table_value::<CallV1>(&v).unwrap_err();
        assert_eq!(
            e.to_string(),
            "record `call`: expected type id 7, found 9",
            "{e}"
        );
        let e = decode_table_value::<CallV1>(&[1]).unwrap_err();
        assert!(e.to_string().contains("expected"), "{e}");
        let e = decode_unit::<CallV1>(UnitRef {
            kind: 7,
            layout_version: 1,
            state: &[0; 8],
        })
        .unwrap_err();
        assert!(matches!(e, RecordError::TooShort { .. }), "{e}");
    }
}
