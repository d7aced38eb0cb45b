package relay

import (
	"strings"
	"testing"
	"time"
)

func TestFirstReceivedUID(t *testing.T) {
	for _, tc := range []struct {
		head string
		uid  uint32
		ok   bool
	}{
		{"Received: (qmail 1234 invoked by uid 1001); 28 Nov 2026 02:41:53 -0000\nSubject: x\n\n", 1001, true},
		{"received:  (qmail 1 invoked by uid 0); date\n\n", 0, true},
		// Only the first Received counts, even when a later one is qmail's.
		{"Received: from x by y\nReceived: (qmail 1 invoked by uid 33); d\n\n", 0, false},
		{"Subject: s\nReceived: (qmail 9 invoked by uid 48); d\nReceived: (qmail 9 invoked by uid 1); d\n\n", 48, true},
		// In the body it is not a header.
		{"Subject: s\n\nReceived: (qmail 9 invoked by uid 48); d\n", 0, false},
		{"Received: (qmail 1 invoked from network); d\n\n", 0, false},
		{"Received: (qmail x invoked by uid 5); d\n\n", 0, false},
		{"Received: (qmail 1 invoked by uid 99999999999); d\n\n", 0, false},
		{"Received: (qmail 1 invoked by uid 5)\n\n", 0, false},
		// Folded: unfolding keeps the whitespace (RFC 5322 §2.2.3).
		{"Received: (qmail 77 invoked\n by uid 5); d\n\n", 5, true},
		{"Received:\n (qmail 77 invoked by uid 5); d\n\n", 5, true},
	} {
		uid, ok := firstReceivedUID([]byte(tc.head))
		if uid != tc.uid || ok != tc.ok {
			t.Errorf("firstReceivedUID(%q) = %d, %v; want %d, %v", tc.head, uid, ok, tc.uid, tc.ok)
		}
	}
}

func TestPHPOriginatingScript(t *testing.T) {
	for _, tc := range []struct {
		head   string
		uid    uint32
		script string
		ok     bool
	}{
		{"X-PHP-Originating-Script: 1001:contact.php\n\n", 1001, "contact.php", true},
		{"To: a\nx-php-originating-script:  33:/var/www/a b.php \nX-PHP-Originating-Script: 0:forged.php\n\n", 33, "/var/www/a b.php", true},
		{"X-PHP-Originating-Script: abc:x.php\n\n", 0, "", false},
		{"X-PHP-Originating-Script: 12\n\n", 0, "", false},
		{"Subject: x\n\nX-PHP-Originating-Script: 1:body.php\n", 0, "", false},
	} {
		uid, script, ok := phpOriginatingScript([]byte(tc.head))
		if uid != tc.uid || script != tc.script || ok != tc.ok {
			t.Errorf("phpOriginatingScript(%q) = %d, %q, %v; want %d, %q, %v", tc.head, uid, script, ok, tc.uid, tc.script, tc.ok)
		}
	}
}

func TestHeaderSubject(t *testing.T) {
	if got := firstHeader([]byte("From: a\nSubject: hello\n world\n\nSubject: no\n"), "subject"); got != "hello world" {
		t.Errorf("subject = %q", got)
	}
}

func TestFormatReceived(t *testing.T) {
	when := time.Date(2024, 3, 5, 7, 4, 9, 0, time.FixedZone("x", 3600))
	for _, tc := range []struct {
		ri   receivedInfo
		want string
	}{
		{receivedInfo{Helo: "c", HasHelo: true, Remote: "127.0.0.1", By: "mail.example.test", Received: when},
			"Received: from unknown (HELO c) (127.0.0.1)\n  by mail.example.test with SMTP; 5 Mar 2024 06:04:09 -0000\n"},
		{receivedInfo{Helo: "UNKNOWN", HasHelo: true, Remote: "::1", By: "m", Received: when},
			"Received: from unknown (::1)\n  by m with SMTP; 5 Mar 2024 06:04:09 -0000\n"},
		{receivedInfo{Helo: "odd\x01<helo>(x) [1.2.3.4]", HasHelo: true, Remote: "10.0.0.1", By: "m", User: "bob", Received: when},
			"Received: from unknown (HELO odd??helo??x??[1.2.3.4]) (bob@10.0.0.1)\n  by m with ESMTPA; 5 Mar 2024 06:04:09 -0000\n"},
		{receivedInfo{Helo: "h", HasHelo: true, Remote: "10.0.0.1", By: "m", TLS: true, Received: when},
			"Received: from unknown (HELO h) (10.0.0.1)\n  by m with ESMTPS; 5 Mar 2024 06:04:09 -0000\n"},
		{receivedInfo{Helo: "h", HasHelo: true, Remote: "10.0.0.1", By: "m", TLS: true, User: "a b", Received: when},
			"Received: from unknown (HELO h) (a?b@10.0.0.1)\n  by m with ESMTPSA; 5 Mar 2024 06:04:09 -0000\n"},
		{receivedInfo{Local: true, UID: 1001, Received: when},
			"Received: (relay invoked by uid 1001); 5 Mar 2024 06:04:09 -0000\n"},
	} {
		if got := formatReceived(tc.ri); got != tc.want {
			t.Errorf("formatReceived(%+v)\n got %q\nwant %q", tc.ri, got, tc.want)
		}
	}
}

func FuzzHeaderParsers(f *testing.F) {
	for _, s := range []string{
		"Received: (qmail 1234 invoked by uid 1001); 28 Nov 2026 02:41:53 -0000\nX-PHP-Originating-Script: 1001:a.php\nSubject: s\n\n",
		"Received:\n (qmail 1 invoked by uid 2); d\n\n",
		"X-PHP-Originating-Script: 4294967295:x\n",
		": x\nReceived: y\n",
		"\n\nReceived: (qmail 1 invoked by uid 2); d\n",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, head []byte) {
		uid, ok := firstReceivedUID(head)
		if !ok && uid != 0 {
			t.Fatalf("uid %d without ok", uid)
		}
		if ok && !strings.Contains(string(head), "invoked by uid") {
			t.Fatalf("uid from a header without the qmail text")
		}
		phpUID, script, phpOK := phpOriginatingScript(head)
		if !phpOK && (phpUID != 0 || script != "") {
			t.Fatalf("values without ok")
		}
		firstHeader(head, "Subject")
		// Whatever we write into Received is one clean header.
		r := formatReceived(receivedInfo{Helo: string(head), HasHelo: true, Remote: string(head), User: string(head), By: "m"})
		if strings.Count(r, "\n") != 2 || strings.ContainsAny(strings.ReplaceAll(r, "\n", ""), "\r\x00") {
			t.Fatalf("unsafe Received %q", r)
		}
	})
}
