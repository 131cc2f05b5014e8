//! The fleet event queue's on-disk records (`events::record`) and the event message parser
//! their bodies and the socket feed (`Event::from_message`).

#![no_main]

use libfuzzer_sys::fuzz_target;
use powernode::events::Event;
use powernode::events::record::{self, Decoded};

fuzz_target!(|data: &[u8]| {
    let scan = record::scan(data, 0);
    assert!(scan.valid_end <= data.len());
    let mut last = 0;
    for f in &scan.records {
        // Found records lie inside the buffer, in increasing order, and decode again.
        assert!(f.seq > last);
        last = f.seq;
        let end = f.offset + f.total;
        assert!(end <= data.len());
        let Decoded::Record { seq, body, total } = record::decode(&data[f.offset..end]) else {
            panic!("scan found a record that does not decode");
        };
        assert_eq!((seq, total), (f.seq, f.total));
        // Re-encoding gives back the same bytes.
        let mut again = Vec::new();
        record::encode(seq, body, &mut again);
        assert_eq!(again, &data[f.offset..end]);
        let _ = Event::from_message(body, record::MAX_BODY, "fuzz");
    }
    let _ = Event::from_message(data, record::MAX_BODY, "fuzz");
});
