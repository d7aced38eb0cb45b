package policy

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestOpenDBLocked(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "data")
	db, err := OpenDB(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	if fi, err := os.Stat(dir); err != nil || fi.Mode().Perm() != 0o711 {
		t.Fatalf("data dir: %v %v", fi.Mode(), err)
	}
	_, err = OpenDB(dir)
	if err == nil || !strings.Contains(err.Error(), "is locked by another relay process") || !strings.Contains(err.Error(), filepath.Join(dir, DBFile)) {
		t.Fatalf("second open: %v", err)
	}
}

func TestOpenDBCorrupt(t *testing.T) {
	for name, content := range map[string][]byte{
		"garbage": bytes.Repeat([]byte("not a bbolt file "), 1000),
		"short":   []byte("hello"),
	} {
		t.Run(name, func(t *testing.T) {
			dir := t.TempDir()
			path := filepath.Join(dir, DBFile)
			if err := os.WriteFile(path, content, 0o600); err != nil {
				t.Fatal(err)
			}
			db, err := OpenDB(dir)
			if err == nil {
				db.Close()
				t.Fatal("corrupt database opened")
			}
			if !strings.Contains(err.Error(), path) {
				t.Fatalf("error does not name the file: %v", err)
			}
			if got, _ := os.ReadFile(path); !bytes.Equal(got, content) {
				t.Fatal("corrupt file was changed")
			}
		})
	}
}

func TestStateRoundTrip(t *testing.T) {
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC).UnixNano()
	st := &idState{id: "uid:web1:33", kind: "uid", account: "bob", scripts: []string{"a.php", "b.php"},
		lastSeen: now, lastOver: now - 5, lastLogged: now - 5, overTimes: []int64{now - 10, now - 5},
		sampleID: "<x@y>", sampleSubject: "hi", lastDecision: "defer: ..."}
	w := newWindow(metricRcpts, time.Hour)
	w.add(now-int64(time.Minute), 3)
	w.add(now, 2)
	w.reserved = 7 // reservations are not stored
	st.windows = append(st.windows, w, newWindow(metricMsgs, time.Minute))
	got, err := decodeState(st.id, encodeState(st, now), now)
	if err != nil {
		t.Fatal(err)
	}
	if got.account != "bob" || len(got.scripts) != 2 || got.lastSeen != now || len(got.overTimes) != 2 ||
		got.sampleSubject != "hi" || len(got.windows) != 1 || got.windows[0].sum != 5 || got.windows[0].reserved != 0 {
		t.Fatalf("round trip: %+v", got)
	}
	// Loading an hour later drops what expired.
	got, _ = decodeState(st.id, encodeState(st, now), now+int64(2*time.Hour))
	if got.windows[0].sum != 0 || len(got.windows[0].buckets) != 0 {
		t.Fatalf("expired buckets kept: %+v", got.windows[0])
	}
}

// FuzzDecodeState feeds arbitrary records to the state decoder: it must
// never panic, what it accepts must encode back to a record it accepts,
// and storedTimes (the head-only reader of New and the expiry scan) must
// read the same times from it.
func FuzzDecodeState(f *testing.F) {
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC).UnixNano()
	st := &idState{id: "user:x", account: "a", scripts: []string{"s"}, overTimes: []int64{now}}
	w := newWindow(metricRcpts, 10*time.Second)
	w.add(now, 4)
	st.windows = []window{w}
	f.Add(encodeState(st, now))
	f.Add([]byte{stateVersion})
	f.Add([]byte{stateVersion, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 2, 2, 0xff})
	f.Fuzz(func(t *testing.T, v []byte) {
		seen, over, headOK := storedTimes(v)
		got, err := decodeState("user:x", v, now)
		if err != nil {
			return
		}
		if !headOK || seen != got.lastSeen || over != got.lastOver {
			t.Fatalf("storedTimes = %d, %d, %v; decodeState read %d, %d", seen, over, headOK, got.lastSeen, got.lastOver)
		}
		if _, err := decodeState("user:x", encodeState(got, now), now); err != nil {
			t.Fatalf("re-encoded record rejected: %v", err)
		}
	})
}
