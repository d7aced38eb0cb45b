package signals

import (
	"bytes"
	"encoding/binary"
	"hash/crc32"
	"testing"
)

// The stored records and journal frames decode whatever bytes relay.db or
// a crashed journal holds without panicking, and what decodes encodes
// back to the same bytes.
func FuzzDecodeRecords(f *testing.F) {
	h := handoff{Seq: 7, QP: 4242, At: testTime.UnixNano(), From: "bob@example.com\x00\xff", IDs: []string{"user:bob", "sender:bob@example.com"}}
	m := message{N: 12345, IDs: h.IDs, Seen: 1, QP: 0, Stamp: 2, Pending: []outcome{{outcomeFailure, 3}}, Open: []uint64{1, 2}}
	tm := message{N: 1, Seen: 5, QP: 99, From: "a@x", Pending: []outcome{{outcomeDeferral, 4}, {outcomeSuccess, 0}}}
	s := savedState{File: &filePos{Name: "/var/log/qmail/current", Dev: 1, Ino: 2, Offset: 300}, Cut: []byte("info msg 1: bytes"), CutStamp: 9, LastSeq: 7}
	for _, b := range [][]byte{appendHandoff(nil, &h), appendMessage(nil, &m), appendMessage(nil, &tm), appendState(nil, &s), appendState(nil, &savedState{}), {}, {stateVersion, 0xff}} {
		f.Add(b)
	}
	rec := appendHandoff(nil, &h)
	frame := binary.LittleEndian.AppendUint32(nil, uint32(len(rec)))
	frame = binary.LittleEndian.AppendUint32(frame, crc32.Checksum(rec, crcTable))
	f.Add(append(frame, rec...)) // a journal frame as journal.append writes it
	f.Fuzz(func(t *testing.T, b []byte) {
		if h, err := decodeHandoff(b); err == nil {
			if again := appendHandoff(nil, &h); !bytes.Equal(again, b) && canonical(b) {
				t.Fatalf("handoff %+v: %x, want %x", h, again, b)
			}
		}
		if m, err := decodeMessage(b); err == nil {
			appendMessage(nil, m)
		}
		if s, err := decodeState(b); err == nil {
			appendState(nil, &s)
		}
		if h, rest, err := nextJournalRecord(b); err == nil && len(rest) > len(b) {
			t.Fatalf("%+v: rest grew", h)
		}
	})
}

// canonical reports whether b's varints are minimal, as Append writes
// them: only then must a decoded record encode to the same bytes.
func canonical(b []byte) bool {
	for i := 0; i+1 < len(b); i++ {
		if b[i]&0x80 != 0 && b[i+1] == 0x00 { // a continued varint's last byte 0: not minimal
			return false
		}
	}
	return true
}
