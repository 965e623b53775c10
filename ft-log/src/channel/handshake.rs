//! The handshake, one function per side. Both return the session key and
//! what the peer said about itself.

use std::io::{Read, Write};
use std::net::TcpStream;

use super::wire::{self, kind, Hello, Refusal, GREETING_LEN};
use super::{ChannelConfig, ChannelError, PeerInfo, Role};

/// What a finished handshake leaves: the session key, the largest `Data`
/// payload the peer accepts, and the peer's hello.
pub(crate) struct Session {
    pub key: [u8; 32],
    pub peer_max_message: usize,
    pub peer: PeerInfo,
}

fn encode_hello(h: &Hello) -> Vec<u8> {
    postcard::to_stdvec(h).expect("hellos always serialise")
}

fn decode_hello(body: &[u8], expect: Role) -> Result<Hello, ChannelError> {
    let h: Hello = postcard::from_bytes(body).map_err(|e| {
        ChannelError::Handshake(format!("the {expect}'s hello does not decode: {e}"))
    })?;
    if h.role != expect {
        return Err(ChannelError::Handshake(format!(
            "the peer introduced itself as a {}, expected a {expect}",
            h.role
        )));
    }
    Ok(h)
}

fn exchange_greetings(
    s: &mut TcpStream,
    peer: Role,
    cfg: &ChannelConfig,
) -> Result<(), ChannelError> {
    let t = cfg.handshake_timeout;
    s.write_all(&wire::greeting())
        .map_err(|e| wire::handshake_io(e, "sending the greeting", peer, t))?;
    let mut g = [0u8; GREETING_LEN];
    s.read_exact(&mut g)
        .map_err(|e| wire::handshake_io(e, "the greeting", peer, t))?;
    wire::check_greeting(&g)
}

fn peer_info(s: &TcpStream, h: Hello) -> PeerInfo {
    PeerInfo {
        addr: s.peer_addr().ok(),
        role: h.role,
        vm_name: h.vm_name,
        generation: h.generation,
        config_hash: h.config_hash,
        hello: h.blob,
    }
}

/// The primary's side: greeting, hello, proof, then the backup's verdict.
pub(crate) fn primary(s: &mut TcpStream, cfg: &ChannelConfig) -> Result<Session, ChannelError> {
    let t = cfg.handshake_timeout;
    let peer = Role::Backup;
    exchange_greetings(s, peer, cfg)?;
    let mine = Hello {
        role: Role::Primary,
        nonce: wire::nonce()?,
        vm_name: cfg.vm_name.clone(),
        generation: cfg.generation,
        config_hash: cfg.config_hash.clone(),
        max_message: cfg.max_message as u32,
        blob: cfg.hello.clone(),
    };
    let mine_bytes = encode_hello(&mine);
    wire::write_handshake(s, kind::HELLO, &mine_bytes, peer, t)?;
    let (k, theirs_bytes) = wire::read_handshake(s, peer, t)?;
    if k == kind::REFUSE {
        return Err(refusal(&theirs_bytes));
    }
    if k != kind::HELLO {
        return Err(ChannelError::Handshake(format!(
            "expected the backup's hello, got message kind {k:#04x}"
        )));
    }
    let theirs = decode_hello(&theirs_bytes, peer)?;
    let tr = wire::transcript(&mine_bytes, &theirs_bytes);
    wire::write_handshake(
        s,
        kind::PROOF,
        &wire::proof(&cfg.secret, Role::Primary, &tr),
        peer,
        t,
    )?;
    let (k, body) = wire::read_handshake(s, peer, t)?;
    match k {
        kind::REFUSE => return Err(refusal(&body)),
        kind::ACCEPT => {}
        _ => {
            return Err(ChannelError::Handshake(format!(
                "expected the backup's verdict, got message kind {k:#04x}"
            )))
        }
    }
    if !wire::verify_proof(&cfg.secret, Role::Backup, &tr, &body) {
        return Err(ChannelError::AuthFailed);
    }
    if theirs.generation != cfg.generation {
        return Err(ChannelError::Handshake(format!(
            "the backup reports generation {}, we sent {}",
            theirs.generation, cfg.generation
        )));
    }
    Ok(Session {
        key: wire::session_key(&cfg.secret, &tr),
        peer_max_message: (theirs.max_message as usize).clamp(1, wire::MAX_MESSAGE),
        peer: peer_info(s, theirs),
    })
}

fn refusal(body: &[u8]) -> ChannelError {
    match postcard::from_bytes::<Refusal>(body) {
        Ok(r) => r.into_error(),
        Err(e) => {
            ChannelError::Handshake(format!("the backup refused with an unreadable reason: {e}"))
        }
    }
}

/// The backup's side: greeting, the primary's hello, our hello, the
/// primary's proof, then accept (with our proof) or refuse.
pub(crate) fn backup(s: &mut TcpStream, cfg: &ChannelConfig) -> Result<Session, ChannelError> {
    let t = cfg.handshake_timeout;
    let peer = Role::Primary;
    exchange_greetings(s, peer, cfg)?;
    let (k, theirs_bytes) = wire::read_handshake(s, peer, t)?;
    if k != kind::HELLO {
        return Err(ChannelError::Handshake(format!(
            "expected the primary's hello, got message kind {k:#04x}"
        )));
    }
    let theirs = decode_hello(&theirs_bytes, peer)?;
    let mine = Hello {
        role: Role::Backup,
        nonce: wire::nonce()?,
        vm_name: cfg.vm_name.clone(),
        generation: theirs.generation,
        config_hash: cfg.config_hash.clone(),
        max_message: cfg.max_message as u32,
        blob: cfg.hello.clone(),
    };
    let mine_bytes = encode_hello(&mine);
    wire::write_handshake(s, kind::HELLO, &mine_bytes, peer, t)?;
    let tr = wire::transcript(&theirs_bytes, &mine_bytes);
    let (k, body) = wire::read_handshake(s, peer, t)?;
    if k != kind::PROOF {
        return Err(ChannelError::Handshake(format!(
            "expected the primary's proof, got message kind {k:#04x}"
        )));
    }
    let refuse = |s: &mut TcpStream, r: Refusal| {
        let body = postcard::to_stdvec(&r).expect("refusals always serialise");
        // Best effort: the error we return says the same.
        let _ = wire::write_handshake(s, kind::REFUSE, &body, peer, t);
        r.into_error()
    };
    if !wire::verify_proof(&cfg.secret, Role::Primary, &tr, &body) {
        let _ = refuse(s, Refusal::Auth);
        return Err(ChannelError::AuthFailed);
    }
    if !cfg.vm_name.is_empty() && theirs.vm_name != cfg.vm_name {
        return Err(refuse(
            s,
            Refusal::VmName {
                primary: theirs.vm_name,
                backup: cfg.vm_name.clone(),
            },
        ));
    }
    if theirs.config_hash != cfg.config_hash {
        return Err(refuse(
            s,
            Refusal::ConfigHash {
                primary: theirs.config_hash,
                backup: cfg.config_hash.clone(),
            },
        ));
    }
    wire::write_handshake(
        s,
        kind::ACCEPT,
        &wire::proof(&cfg.secret, Role::Backup, &tr),
        peer,
        t,
    )?;
    Ok(Session {
        key: wire::session_key(&cfg.secret, &tr),
        peer_max_message: (theirs.max_message as usize).clamp(1, wire::MAX_MESSAGE),
        peer: peer_info(s, theirs),
    })
}
