package e2e

import (
	"crypto/tls"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"
	"golang.org/x/crypto/bcrypt"

	"relay/internal/testcert"
)

// TestAuthOverSTARTTLS: on the submission port, STARTTLS with a certificate
// made here, then AUTH checked by a qmail checkpassword program and by a
// users_file; the mail is relayed, counted as user:, and its Received line
// says ESMTPSA with the login.
func TestAuthOverSTARTTLS(t *testing.T) {
	dir := t.TempDir()
	cert, key := testcert.Write(t, dir, "mail.example.test")
	// checkpassword: fd 3 carries login\0password\0timestamp\0.
	checkpw := filepath.Join(dir, "checkpassword")
	script := "#!/bin/sh\nIFS= read -r -d '' login <&3; IFS= read -r -d '' pass <&3\n" +
		"[ \"$login\" = vpopuser@example.com ] && [ \"$pass\" = 'cp secret' ] && exec \"$@\"\nexit 1\n"
	if err := os.WriteFile(checkpw, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	hash, err := bcrypt.GenerateFromPassword([]byte("file secret"), bcrypt.MinCost)
	if err != nil {
		t.Fatal(err)
	}
	users := filepath.Join(dir, "users")
	if err := os.WriteFile(users, []byte("fileuser:"+string(hash)+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	d := newDaemon(t, daemonOpts{
		relay: "[relay]\nlocal_domains = [\"example.com\"]\nrelay_networks = []\n",
		extraTOML: fmt.Sprintf("[tls]\ncert = %q\nkey = %q\n\n[auth]\ncheckpassword = %q\nusers_file = %q\nrequire_tls = true\n",
			cert, key, "/bin/bash "+checkpw+" /bin/true", users),
	})

	for _, login := range []struct{ user, pass string }{{"vpopuser@example.com", "cp secret"}, {"fileuser", "file secret"}} {
		conn, err := net.DialTimeout("tcp", d.sub, 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		c, err := smtp.NewClientStartTLS(conn, &tls.Config{InsecureSkipVerify: true})
		if err != nil {
			t.Fatalf("STARTTLS: %v", err)
		}
		if err := c.Hello("client.example"); err != nil {
			t.Fatal(err)
		}
		if err := c.Auth(sasl.NewPlainClient("", login.user, "wrong")); err == nil {
			t.Fatalf("%s: a wrong password was accepted", login.user)
		}
		c.Close()

		conn, err = net.DialTimeout("tcp", d.sub, 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		c, err = smtp.NewClientStartTLS(conn, &tls.Config{InsecureSkipVerify: true})
		if err != nil {
			t.Fatal(err)
		}
		if err := c.Hello("client.example"); err != nil {
			t.Fatal(err)
		}
		if err := c.Auth(sasl.NewPlainClient("", login.user, login.pass)); err != nil {
			t.Fatalf("%s: AUTH: %v", login.user, err)
		}
		if err := c.SendMail("someone@example.com", []string{"friend@far.example"}, strings.NewReader("Subject: tls\r\n\r\nhi\r\n")); err != nil {
			t.Fatalf("%s: relaying after AUTH: %v", login.user, err)
		}
		c.Quit()
	}
	calls := d.queued()
	if len(calls) != 2 {
		t.Fatalf("%d messages queued, want 2", len(calls))
	}
	for i, who := range []string{"vpopuser@example.com", "fileuser"} {
		first := strings.SplitN(string(calls[i].Message), "\n", 3)
		if !strings.Contains(first[0], "("+who+"@127.0.0.1)") || !strings.Contains(first[1], " with ESMTPSA; ") {
			t.Errorf("Received for %s: %q", who, first[:2])
		}
	}
	code, body := d.api("GET", "/api/senders/"+strings.ReplaceAll("user:vpopuser@example.com", ":", "%3A"))
	if code != 200 || !strings.Contains(body, `"user:vpopuser@example.com"`) {
		t.Errorf("user identity not counted: %d %s", code, body)
	}
}
