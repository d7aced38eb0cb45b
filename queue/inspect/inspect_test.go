package inspect

import (
	"bytes"
	"context"
	"encoding/json"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"testing"
	"time"
)

var accounts = map[uint32]string{0: "root", 1001: "alice", 1002: "carol"}

type fixtureIDs struct {
	local, auth, plain, todo, bounce, uncommitted uint64
}

var (
	t1 = time.Date(2026, 11, 28, 2, 41, 53, 0, time.UTC)
	t2 = t1.Add(time.Minute)
	t3 = t1.Add(2 * time.Minute)
	t4 = t1.Add(3 * time.Minute)
)

// buildFixture lays out one message of each origin qmail knows.
func buildFixture(t testing.TB, dir string) fixtureIDs {
	var ids fixtureIDs
	// A PHP script of uid 1001 sending to three remote and one local
	// address; one remote delivery is done.
	ids.local = addMessage(t, dir, fixtureMsg{
		mess:   messFile([]string{localQQLine}, "X-PHP-Originating-Script: 1001:contact.php"),
		info:   "www@shop.example",
		local:  []string{"Tshop-owner@shop.example"},
		remote: []string{"Tr1@example.net", "Dr2@example.net", "Tr3@example.org"},
		queued: t2,
	})
	// bob authenticated over SMTP (relay's own Received: ESMTPSA).
	ids.auth = addMessage(t, dir, fixtureMsg{
		mess:   messFile(networkLines(5151, "unknown (HELO laptop) (bob@192.0.2.7)", "ESMTPSA"), "X-Sender-Id: user:bob"),
		info:   "Bob@Example.com",
		remote: []string{"Tx@example.net", "Ty@example.net"},
		queued: t1,
	})
	// An unauthenticated relay client (no HELO given: qmail leaves it out).
	ids.plain = addMessage(t, dir, fixtureMsg{
		mess:   messFile(networkLines(6161, "unknown (198.51.100.9)", "SMTP")),
		info:   "bob@example.com",
		remote: []string{"Dz@example.net"},
		queued: t3,
	})
	// Committed by qmail-queue, not yet preprocessed by qmail-send.
	ids.todo = addMessage(t, dir, fixtureMsg{
		mess: messFile([]string{"Received: (qmail 7171 invoked by uid 1001); " + date}),
		todo: "u1001\x00p7171\x00Fwww@shop.example\x00Ta@example.net\x00Tb@example.net\x00",
	})
	// A bounce from qmail-send, null sender, bouncing.
	ids.bounce = addMessage(t, dir, fixtureMsg{
		mess:   messFile([]string{"Received: (qmail 8181 invoked for bounce); " + date}),
		info:   "",
		remote: []string{"Twww@shop.example"},
		queued: t4,
		bounce: true,
	})
	// qmail-queue is still writing this one: mess only.
	ids.uncommitted = addMessage(t, dir, fixtureMsg{
		mess: messFile([]string{"Received: (qmail 9191 invoked by uid 1002); " + date}),
	})
	return ids
}

func intp(n int) *int { return &n }

func TestReadFixture(t *testing.T) {
	dir := newQueue(t)
	ids := buildFixture(t, dir)
	r := &Reader{Dir: dir, Accounts: accounts, Recipients: true}
	msgs, st, err := r.Read(context.Background(), nil)
	if err != nil {
		t.Fatal(err)
	}
	if st.Listed != 6 || st.Messages != 5 || st.Skipped != 1 || st.Failed != 0 {
		t.Errorf("stats = %+v, want 6 listed, 5 read, 1 skipped", st)
	}
	size := func(id uint64) int64 {
		fi, err := os.Stat(filepath.Join(dir, "mess", strconv.FormatUint(id%qmailSplit, 10), strconv.FormatUint(id, 10)))
		if err != nil {
			t.Fatal(err)
		}
		return fi.Size()
	}
	want := []Message{
		{
			ID: ids.auth, Preprocessed: true, QueueTime: t1, Sender: "Bob@Example.com", Left: 2,
			Recipients: []Recipient{{Addr: "x@example.net", Remote: true}, {Addr: "y@example.net", Remote: true}},
			Size:       size(ids.auth),
			Origin:     Origin{Kind: KindNetwork, QP: 5151, Host: "unknown", HELO: "laptop", IP: "192.0.2.7", AuthUser: "bob", Protocol: "ESMTPSA"},
			SenderID:   "user:bob",
		},
		{
			ID: ids.local, Preprocessed: true, QueueTime: t2, Sender: "www@shop.example", Left: 3, Done: 1,
			Recipients: []Recipient{
				{Addr: "shop-owner@shop.example"},
				{Addr: "r1@example.net", Remote: true},
				{Addr: "r2@example.net", Remote: true, Done: true},
				{Addr: "r3@example.org", Remote: true},
			},
			Size:      size(ids.local),
			Origin:    Origin{Kind: KindUID, QP: 4242, UID: intp(1001), Account: "alice"},
			PHPScript: "1001:contact.php",
		},
		{
			ID: ids.plain, Preprocessed: true, QueueTime: t3, Sender: "bob@example.com", Done: 1,
			Recipients: []Recipient{{Addr: "z@example.net", Remote: true, Done: true}},
			Size:       size(ids.plain),
			Origin:     Origin{Kind: KindNetwork, QP: 6161, Host: "unknown", IP: "198.51.100.9", Protocol: "SMTP"},
		},
		{
			ID: ids.bounce, Preprocessed: true, QueueTime: t4, Sender: "", Left: 1,
			Recipients: []Recipient{{Addr: "www@shop.example", Remote: true}},
			Size:       size(ids.bounce), Bouncing: true,
			Origin: Origin{Kind: KindBounce, QP: 8181},
		},
		{
			ID: ids.todo, Sender: "www@shop.example", Left: 2,
			Recipients: []Recipient{{Addr: "a@example.net"}, {Addr: "b@example.net"}},
			Size:       size(ids.todo),
			Origin:     Origin{Kind: KindUID, QP: 7171, UID: intp(1001), Account: "alice"},
		},
	}
	if !reflect.DeepEqual(msgs, want) {
		for i := range max(len(msgs), len(want)) {
			var got, exp Message
			if i < len(msgs) {
				got = msgs[i]
			}
			if i < len(want) {
				exp = want[i]
			}
			if !reflect.DeepEqual(got, exp) {
				t.Errorf("message %d:\n got %+v\nwant %+v", i, got, exp)
			}
		}
	}

	// Without Recipients only the counts are kept.
	r.Recipients = false
	msgs, _, err = r.Read(context.Background(), nil)
	if err != nil {
		t.Fatal(err)
	}
	if msgs[1].Recipients != nil || msgs[1].Left != 3 || msgs[1].Done != 1 {
		t.Errorf("without Recipients: %+v", msgs[1])
	}

	var table bytes.Buffer
	if err := WriteList(&table, msgs); err != nil {
		t.Fatal(err)
	}
	t.Logf("\n%s", table.String())
	lines := strings.Split(strings.TrimRight(table.String(), "\n"), "\n")
	if len(lines) != 6 {
		t.Fatalf("table has %d lines, want header + 5:\n%s", len(lines), table.String())
	}
	wantCells := [][]string{
		{"ID", "QUEUED", "(UTC)", "SIZE", "LEFT", "DONE", "SENDER", "ORIGIN", "SCRIPT", "SENDER-ID"},
		{strconv.FormatUint(ids.auth, 10), "2026-11-28", "02:41:53", strconv.FormatInt(size(ids.auth), 10), "2", "0", "<Bob@Example.com>", "network", "192.0.2.7", "helo=laptop", "user=bob", "-", "user:bob"},
		{strconv.FormatUint(ids.local, 10), "2026-11-28", "02:42:53", strconv.FormatInt(size(ids.local), 10), "3", "1", "<www@shop.example>", "uid", "1001", "(alice)", "1001:contact.php", "-"},
		{strconv.FormatUint(ids.plain, 10), "2026-11-28", "02:43:53", strconv.FormatInt(size(ids.plain), 10), "0", "1", "<bob@example.com>", "network", "198.51.100.9", "-", "-"},
		{strconv.FormatUint(ids.bounce, 10), "2026-11-28", "02:44:53", "bouncing", strconv.FormatInt(size(ids.bounce), 10), "1", "0", "<>", "bounce", "-", "-"},
		{strconv.FormatUint(ids.todo, 10), "not", "yet", "preprocessed", strconv.FormatInt(size(ids.todo), 10), "2", "0", "<www@shop.example>", "uid", "1001", "(alice)", "-", "-"},
	}
	for i, line := range lines {
		if got := strings.Fields(line); !reflect.DeepEqual(got, wantCells[i]) {
			t.Errorf("table line %d = %q, want cells %q", i, line, wantCells[i])
		}
	}
	// Aligned: every line starts its SENDER column at the same offset.
	col := strings.Index(lines[0], "SENDER ")
	for _, line := range lines[1:] {
		if line[col] != '<' {
			t.Errorf("SENDER column not aligned at %d in %q", col, line)
		}
	}

	var js bytes.Buffer
	if err := json.NewEncoder(&js).Encode(msgs); err != nil {
		t.Fatal(err)
	}
	var back []map[string]any
	if err := json.Unmarshal(js.Bytes(), &back); err != nil {
		t.Fatal(err)
	}
	if back[1]["origin"].(map[string]any)["uid"] != 1001.0 || back[4]["queue_time"] != nil || back[0]["queue_time"] != "2026-11-28T02:41:53Z" {
		t.Errorf("JSON = %s", js.String())
	}
}

func TestTopFixture(t *testing.T) {
	dir := newQueue(t)
	buildFixture(t, dir)
	// Make uid 1001 the spam run: five more messages of ten recipients.
	for range 5 {
		rcpts := make([]string, 10)
		for i := range rcpts {
			rcpts[i] = "Tvictim" + strconv.Itoa(i) + "@example.net"
		}
		addMessage(t, dir, fixtureMsg{
			mess: messFile([]string{localQQLine}), info: "WWW@shop.example", remote: rcpts, queued: t1,
		})
	}
	msgs, _, err := (&Reader{Dir: dir, Accounts: accounts}).Read(context.Background(), nil)
	if err != nil {
		t.Fatal(err)
	}
	top := Summarize(msgs, 3)
	wantOrigin := []Group{
		{Key: "uid:1001", Account: "alice", Messages: 7, Recipients: 56, Left: 55},
		{Key: "user:bob", Messages: 1, Recipients: 2, Left: 2},
		{Key: "bounce", Messages: 1, Recipients: 1, Left: 1},
	}
	wantSender := []Group{
		{Key: "sender:www@shop.example", Messages: 7, Recipients: 56, Left: 55},
		{Key: "sender:bob@example.com", Messages: 2, Recipients: 3, Left: 2},
		{Key: "sender:<>", Messages: 1, Recipients: 1, Left: 1},
	}
	for i := range top.ByOrigin {
		top.ByOrigin[i].Bytes = 0
	}
	for i := range top.BySender {
		top.BySender[i].Bytes = 0
	}
	if !reflect.DeepEqual(top.ByOrigin, wantOrigin) {
		t.Errorf("by origin:\n got %+v\nwant %+v", top.ByOrigin, wantOrigin)
	}
	if !reflect.DeepEqual(top.BySender, wantSender) {
		t.Errorf("by sender:\n got %+v\nwant %+v", top.BySender, wantSender)
	}
	all := Summarize(msgs, 0)
	if len(all.ByOrigin) != 4 || all.ByOrigin[3].Key != "ip:198.51.100.9" {
		t.Errorf("all origins = %+v", all.ByOrigin)
	}

	var out bytes.Buffer
	if err := WriteTop(&out, top); err != nil {
		t.Fatal(err)
	}
	first := strings.SplitN(out.String(), "\n", 3)
	if f := strings.Fields(first[1]); len(f) < 3 || f[0] != "uid:1001" || f[1] != "alice" || f[2] != "7" {
		t.Errorf("first group line = %q, want the uid 1001 spam run\n%s", first[1], out.String())
	}
	if !strings.Contains(out.String(), "\nSENDER ") || !strings.Contains(out.String(), "sender:www@shop.example") {
		t.Errorf("no sender section:\n%s", out.String())
	}
}

func TestFilter(t *testing.T) {
	dir := newQueue(t)
	ids := buildFixture(t, dir)
	mustPrefix := func(s string) netip.Prefix {
		p, err := ParsePrefix(s)
		if err != nil {
			t.Fatal(err)
		}
		return p
	}
	tests := []struct {
		name string
		f    Filter
		want []uint64
	}{
		{"all", Filter{}, []uint64{ids.auth, ids.local, ids.plain, ids.bounce, ids.todo}},
		{"sender case-insensitive", Filter{Sender: "bob@EXAMPLE.com"}, []uint64{ids.auth, ids.plain}},
		{"sender domain", Filter{Sender: "@shop.example"}, []uint64{ids.local, ids.todo}},
		{"null sender", Filter{Sender: "<>"}, []uint64{ids.bounce}},
		{"uid", Filter{UID: intp(1001)}, []uint64{ids.local, ids.todo}},
		{"uid none", Filter{UID: intp(0)}, nil},
		{"ip", Filter{IP: mustPrefix("192.0.2.7")}, []uint64{ids.auth}},
		{"ip mapped", Filter{IP: mustPrefix("::ffff:192.0.2.7")}, []uint64{ids.auth}},
		{"cidr", Filter{IP: mustPrefix("198.51.100.0/24")}, []uint64{ids.plain}},
		{"sender and ip", Filter{Sender: "bob@example.com", IP: mustPrefix("198.51.100.0/24")}, []uint64{ids.plain}},
	}
	r := &Reader{Dir: dir}
	for _, tc := range tests {
		msgs, _, err := r.Read(context.Background(), tc.f.Match)
		if err != nil {
			t.Fatal(err)
		}
		var got []uint64
		for _, m := range msgs {
			got = append(got, m.ID)
		}
		if !reflect.DeepEqual(got, tc.want) {
			t.Errorf("%s: got %v, want %v", tc.name, got, tc.want)
		}
	}
	if _, err := ParsePrefix("mail.example.com"); err == nil {
		t.Error("ParsePrefix accepted a host name")
	}
}

func TestReceivedLines(t *testing.T) {
	dir := newQueue(t)
	ids := buildFixture(t, dir)
	lines, err := (&Reader{Dir: dir}).ReceivedLines(ids.auth)
	if err != nil {
		t.Fatal(err)
	}
	want := []string{
		"Received: (qmail 5151 invoked from network); " + date,
		"Received: from unknown (HELO laptop) (bob@192.0.2.7)\n  by mail.example.test with ESMTPSA; " + date,
	}
	if !reflect.DeepEqual(lines, want) {
		t.Errorf("got %q\nwant %q", lines, want)
	}
	var out bytes.Buffer
	if err := WriteReceived(&out, lines); err != nil {
		t.Fatal(err)
	}
	if out.String() != strings.Join(want, "\n")+"\n" {
		t.Errorf("WriteReceived = %q", out.String())
	}
	if _, err := (&Reader{Dir: dir}).ReceivedLines(12345678901); err == nil || !strings.Contains(err.Error(), "not in the queue") {
		t.Errorf("missing message: err = %v", err)
	}
}

func TestNotAQueue(t *testing.T) {
	if _, _, err := (&Reader{Dir: t.TempDir()}).Read(context.Background(), nil); err == nil {
		t.Error("an empty directory read as a queue")
	}
}

// TestReadNeverWrites checks the reader leaves every file's bytes and
// modification time as they were.
func TestReadNeverWrites(t *testing.T) {
	dir := newQueue(t)
	buildFixture(t, dir)
	snapshot := func() map[string]string {
		m := make(map[string]string)
		filepath.Walk(dir, func(p string, fi os.FileInfo, err error) error {
			if err != nil {
				t.Fatal(err)
			}
			data := ""
			if !fi.IsDir() {
				b, _ := os.ReadFile(p)
				data = string(b)
			}
			m[p] = fi.ModTime().String() + fi.Mode().String() + data
			return nil
		})
		return m
	}
	before := snapshot()
	if _, _, err := (&Reader{Dir: dir, Recipients: true}).Read(context.Background(), nil); err != nil {
		t.Fatal(err)
	}
	if after := snapshot(); !reflect.DeepEqual(before, after) {
		t.Error("the queue changed while being read")
	}
}
