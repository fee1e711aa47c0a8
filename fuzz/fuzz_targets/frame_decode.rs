//! Arbitrary bytes as a chunk frame: decoding must never panic, whatever decodes must agree
//! with its header and survive a round trip through `frame::encode`, and a frame split into
//! header and payload (as uploads send it) decodes exactly as the same bytes whole.

#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use sloth_cas::frame::{self, Codec, Frame, FrameHeader, HEADER_LEN};
use sloth_cas::{ChunkId, Error, MAX_CHUNK_LEN};

fuzz_target!(|data: &[u8]| {
    // The input as a chunk, too: any chunk encodes to a frame that decodes back to it.
    if data.len() <= MAX_CHUNK_LEN as usize {
        let framed = frame::encode(&Bytes::copy_from_slice(data), 3);
        assert!(
            framed.stored_len() <= HEADER_LEN + data.len(),
            "encode grew the chunk"
        );
        let id = ChunkId::digest(data);
        let back = frame::decode(&id, &framed.to_bytes()).expect("encoded chunk does not decode");
        assert_eq!(&back[..], data);
        let back = framed
            .decode(&id)
            .expect("encoded chunk does not decode in parts");
        assert_eq!(&back[..], data);
    }

    let header = FrameHeader::parse(data);
    let unverified = frame::decode_unverified(data);

    // `decode` against an id the input chooses (almost always the wrong one).
    if let Some(id) = data.get(..ChunkId::LEN).and_then(ChunkId::from_slice) {
        let whole = frame::decode(&id, data);
        let parts = Frame::from_bytes(Bytes::copy_from_slice(data))
            .expect("longer than a chunk id, so than a header")
            .decode(&id);
        match (&whole, &parts) {
            (Ok(a), Ok(b)) => assert_eq!(a, b, "whole and split decode to different bytes"),
            (Err(_), Err(_)) => {}
            _ => panic!("whole and split disagree: {whole:?} against {parts:?}"),
        }
        match whole {
            Ok(out) => {
                // Only possible when the content really hashes to the id.
                assert_eq!(ChunkId::digest(&out), id);
                assert_eq!(unverified.as_deref().ok(), Some(&out[..]));
            }
            Err(Error::CorruptChunk { id: reported, .. }) => assert_eq!(reported, id),
            Err(other) => panic!("decode failed with an unexpected error: {other}"),
        }
    }

    let out = match unverified {
        Ok(out) => out,
        Err(_) => {
            // Nothing that fails unverified may pass verified, whatever the id.
            let id = ChunkId::digest(data);
            assert!(frame::decode(&id, data).is_err());
            return;
        }
    };

    let header =
        header.expect("decode_unverified succeeded on a frame whose header does not parse");
    assert_eq!(
        out.len(),
        header.len as usize,
        "decoded length differs from the header's"
    );
    if header.codec == Codec::Raw {
        assert_eq!(data.len(), HEADER_LEN + out.len());
        assert_eq!(&data[HEADER_LEN..], &out[..]);
    }

    // The decoded bytes verify against their own id, from the original frame.
    let id = ChunkId::digest(&out);
    let verified =
        frame::decode(&id, data).expect("decode rejected a frame that decodes and hashes");
    assert_eq!(&verified[..], &out[..]);

    // Re-encoding gives a frame no larger than raw storage that decodes to the same bytes.
    let again = frame::encode(&Bytes::from(out.clone()), 3).to_bytes();
    assert!(
        again.len() <= HEADER_LEN + out.len(),
        "encode grew the chunk"
    );
    let again_header = FrameHeader::parse(&again).expect("encode produced an unparseable header");
    assert_eq!(again_header.len as usize, out.len());
    let round = frame::decode_unverified(&again).expect("encode produced an undecodable frame");
    assert_eq!(round, out, "re-encoded frame decodes to different bytes");
    let round = frame::decode(&id, &again).expect("re-encoded frame does not verify");
    assert_eq!(&round[..], &out[..]);
});
