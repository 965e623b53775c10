//! The few messages of etcd's v3 gRPC API (`etcdserverpb`, `mvccpb`) that
//! the arbiter uses, written out with `prost`'s derive macros.
//!
//! They mirror `api/etcdserverpb/rpc.proto` and `api/mvccpb/kv.proto` of
//! etcd 3.x field for field (names, numbers and types); fields the arbiter
//! never sets or reads are left out, which protobuf allows: an unset field is
//! not sent, and an unknown field in an answer is skipped. etcd keeps these
//! field numbers stable across releases (its API compatibility promise), so
//! this needs no `.proto` files and no `protoc` at build time.

/// `etcdserverpb.ResponseHeader`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ResponseHeader {
    /// Cluster id.
    #[prost(uint64, tag = "1")]
    pub cluster_id: u64,
    /// Answering member.
    #[prost(uint64, tag = "2")]
    pub member_id: u64,
    /// Store revision when the request was applied.
    #[prost(int64, tag = "3")]
    pub revision: i64,
    /// Raft term.
    #[prost(uint64, tag = "4")]
    pub raft_term: u64,
}

/// `mvccpb.KeyValue`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct KeyValue {
    /// Key.
    #[prost(bytes = "vec", tag = "1")]
    pub key: Vec<u8>,
    /// Revision of the key's creation.
    #[prost(int64, tag = "2")]
    pub create_revision: i64,
    /// Revision of the last modification.
    #[prost(int64, tag = "3")]
    pub mod_revision: i64,
    /// Number of modifications since creation.
    #[prost(int64, tag = "4")]
    pub version: i64,
    /// Value.
    #[prost(bytes = "vec", tag = "5")]
    pub value: Vec<u8>,
    /// Lease id (0: none).
    #[prost(int64, tag = "6")]
    pub lease: i64,
}

/// `etcdserverpb.RangeRequest` (single-key reads only).
#[derive(Clone, PartialEq, prost::Message)]
pub struct RangeRequest {
    /// Key.
    #[prost(bytes = "vec", tag = "1")]
    pub key: Vec<u8>,
    /// Serve from the local member without a quorum read (false: linearizable).
    #[prost(bool, tag = "7")]
    pub serializable: bool,
}

/// `etcdserverpb.RangeResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RangeResponse {
    /// Header.
    #[prost(message, optional, tag = "1")]
    pub header: Option<ResponseHeader>,
    /// Matching keys.
    #[prost(message, repeated, tag = "2")]
    pub kvs: Vec<KeyValue>,
    /// More keys beyond a limit.
    #[prost(bool, tag = "3")]
    pub more: bool,
    /// Number of matching keys.
    #[prost(int64, tag = "4")]
    pub count: i64,
}

/// `etcdserverpb.PutRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PutRequest {
    /// Key.
    #[prost(bytes = "vec", tag = "1")]
    pub key: Vec<u8>,
    /// Value.
    #[prost(bytes = "vec", tag = "2")]
    pub value: Vec<u8>,
    /// Lease id; the arbiter never uses one (0), so a decision never expires.
    #[prost(int64, tag = "3")]
    pub lease: i64,
}

/// `etcdserverpb.PutResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PutResponse {
    /// Header.
    #[prost(message, optional, tag = "1")]
    pub header: Option<ResponseHeader>,
}

/// `etcdserverpb.RequestOp`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RequestOp {
    /// The operation.
    #[prost(oneof = "request_op::Request", tags = "1, 2")]
    pub request: Option<request_op::Request>,
}

/// The `request` oneof of [`RequestOp`].
pub mod request_op {
    /// One operation of a transaction branch.
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Request {
        /// Read.
        #[prost(message, tag = "1")]
        RequestRange(super::RangeRequest),
        /// Write.
        #[prost(message, tag = "2")]
        RequestPut(super::PutRequest),
    }
}

/// `etcdserverpb.ResponseOp`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ResponseOp {
    /// The operation's result.
    #[prost(oneof = "response_op::Response", tags = "1, 2")]
    pub response: Option<response_op::Response>,
}

/// The `response` oneof of [`ResponseOp`].
pub mod response_op {
    /// One result of a transaction branch.
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Response {
        /// Read result.
        #[prost(message, tag = "1")]
        ResponseRange(super::RangeResponse),
        /// Write result.
        #[prost(message, tag = "2")]
        ResponsePut(super::PutResponse),
    }
}

/// `etcdserverpb.Compare.CompareResult`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum CompareResult {
    /// `==`.
    Equal = 0,
    /// `>`.
    Greater = 1,
    /// `<`.
    Less = 2,
    /// `!=`.
    NotEqual = 3,
}

/// `etcdserverpb.Compare.CompareTarget`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum CompareTarget {
    /// The key's version.
    Version = 0,
    /// The key's creation revision (0: the key does not exist).
    Create = 1,
    /// The key's last modification revision.
    Mod = 2,
    /// The key's value.
    Value = 3,
    /// The key's lease.
    Lease = 4,
}

/// `etcdserverpb.Compare`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Compare {
    /// Comparison.
    #[prost(enumeration = "CompareResult", tag = "1")]
    pub result: i32,
    /// What is compared.
    #[prost(enumeration = "CompareTarget", tag = "2")]
    pub target: i32,
    /// Key.
    #[prost(bytes = "vec", tag = "3")]
    pub key: Vec<u8>,
    /// The value compared against.
    #[prost(oneof = "compare::TargetUnion", tags = "4, 5, 6, 7, 8")]
    pub target_union: Option<compare::TargetUnion>,
}

/// The `target_union` oneof of [`Compare`].
pub mod compare {
    /// The value a [`super::Compare`] compares against.
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum TargetUnion {
        /// Version.
        #[prost(int64, tag = "4")]
        Version(i64),
        /// Creation revision.
        #[prost(int64, tag = "5")]
        CreateRevision(i64),
        /// Modification revision.
        #[prost(int64, tag = "6")]
        ModRevision(i64),
        /// Value.
        #[prost(bytes, tag = "7")]
        Value(Vec<u8>),
        /// Lease.
        #[prost(int64, tag = "8")]
        Lease(i64),
    }
}

/// `etcdserverpb.TxnRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct TxnRequest {
    /// All must hold for `success` to run; otherwise `failure` runs.
    #[prost(message, repeated, tag = "1")]
    pub compare: Vec<Compare>,
    /// Operations if every comparison holds.
    #[prost(message, repeated, tag = "2")]
    pub success: Vec<RequestOp>,
    /// Operations otherwise.
    #[prost(message, repeated, tag = "3")]
    pub failure: Vec<RequestOp>,
}

/// `etcdserverpb.TxnResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct TxnResponse {
    /// Header.
    #[prost(message, optional, tag = "1")]
    pub header: Option<ResponseHeader>,
    /// Whether every comparison held.
    #[prost(bool, tag = "2")]
    pub succeeded: bool,
    /// Results of the branch that ran.
    #[prost(message, repeated, tag = "3")]
    pub responses: Vec<ResponseOp>,
}

/// gRPC method path of `KV.Range`.
pub const KV_RANGE: &str = "/etcdserverpb.KV/Range";
/// gRPC method path of `KV.Txn`.
pub const KV_TXN: &str = "/etcdserverpb.KV/Txn";

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    /// The encoding of the claim transaction, byte for byte, against a
    /// hand-assembled protobuf encoding of the same message per rpc.proto.
    #[test]
    fn claim_txn_encodes_per_rpc_proto() {
        let txn = TxnRequest {
            compare: vec![Compare {
                result: CompareResult::Equal as i32,
                target: CompareTarget::Create as i32,
                key: b"k".to_vec(),
                target_union: Some(compare::TargetUnion::CreateRevision(0)),
            }],
            success: vec![RequestOp {
                request: Some(request_op::Request::RequestPut(PutRequest {
                    key: b"k".to_vec(),
                    value: b"v".to_vec(),
                    lease: 0,
                })),
            }],
            failure: vec![RequestOp {
                request: Some(request_op::Request::RequestRange(RangeRequest {
                    key: b"k".to_vec(),
                    serializable: false,
                })),
            }],
        };
        #[rustfmt::skip]
        let expected: &[u8] = &[
            // compare (1, len 7): target CREATE (2:1), key "k" (3), create_revision 0 (5:0)
            0x0a, 7, 0x10, 1, 0x1a, 1, b'k', 0x28, 0,
            // success (2, len 8): request_put (2, len 6): key "k" (1), value "v" (2)
            0x12, 8, 0x12, 6, 0x0a, 1, b'k', 0x12, 1, b'v',
            // failure (3, len 5): request_range (1, len 3): key "k" (1)
            0x1a, 5, 0x0a, 3, 0x0a, 1, b'k',
        ];
        assert_eq!(txn.encode_to_vec(), expected);
        assert_eq!(TxnRequest::decode(expected).unwrap(), txn);
    }

    #[test]
    fn txn_response_decodes_and_skips_unknown_fields() {
        #[rustfmt::skip]
        let bytes: &[u8] = &[
            // header (1, len 2): revision 9 (3)
            0x0a, 2, 0x18, 9,
            // succeeded = false is not sent; responses (3, len 16):
            //   response_range (1, len 14): kvs (2, len 10): key "k" (1),
            //   create_revision 5 (2), value "own" (5); count 1 (4)
            0x1a, 16, 0x0a, 14, 0x12, 10, 0x0a, 1, b'k', 0x10, 5, 0x2a, 3, b'o', b'w', b'n',
            0x20, 1,
            // an unknown field 99 (varint 1): skipped
            0x98, 0x06, 1,
        ];
        let r = TxnResponse::decode(bytes).unwrap();
        assert!(!r.succeeded);
        assert_eq!(r.header.unwrap().revision, 9);
        match &r.responses[0].response {
            Some(response_op::Response::ResponseRange(rr)) => {
                assert_eq!(rr.count, 1);
                assert_eq!(rr.kvs[0].value, b"own");
                assert_eq!(rr.kvs[0].create_revision, 5);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}
