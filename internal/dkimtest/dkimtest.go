// Package dkimtest checks DKIM signatures in tests the way receivers will:
// with go-msgauth's verifier and, independently, with Debian's python3-dkim
// (dkimpy), over the message as qmail-remote sends it (CRLF line ends).
package dkimtest

import (
	"bytes"
	"encoding/json"
	"os"
	"os/exec"
	"strings"
	"testing"

	msgdkim "github.com/emersion/go-msgauth/dkim"
)

// Python is the interpreter with python3-dkim (Debian's package); the
// python3 on PATH may be another one.
const Python = "/usr/bin/python3"

// HavePythonDKIM reports whether python3-dkim can be imported. Tests skip
// the dkimpy half without it unless RELAY_REQUIRE_PYDKIM=1 (CI) says it
// must be there.
func HavePythonDKIM(t testing.TB) bool {
	t.Helper()
	err := exec.Command(Python, "-c", "import dkim, nacl").Run()
	if err != nil && os.Getenv("RELAY_REQUIRE_PYDKIM") != "" {
		t.Fatalf("python3-dkim is required (RELAY_REQUIRE_PYDKIM) but %s -c 'import dkim, nacl': %v", Python, err)
	}
	return err == nil
}

// CRLF turns a message in qmail's stored form (LF) into what goes on the
// wire.
func CRLF(msg []byte) []byte {
	return bytes.ReplaceAll(msg, []byte("\n"), []byte("\r\n"))
}

// Result is what both verifiers said of one DKIM-Signature, in header
// order.
type Result struct {
	Domain   string
	Selector string // as python3-dkim read it; "" without python3-dkim
	Go       error  // go-msgauth's verdict: nil is a pass
	Python   string // "ok", "fail: ..." or "" without python3-dkim
}

// Check runs both verifiers over msg (stored form, sent as CRLF);
// records maps "<selector>._domainkey.<domain>" to its TXT record.
func Check(t testing.TB, msg []byte, records map[string]string) []Result {
	t.Helper()
	wire := CRLF(msg)
	lookup := func(name string) ([]string, error) {
		if r, ok := records[strings.ToLower(strings.TrimSuffix(name, "."))]; ok {
			return []string{r}, nil
		}
		return nil, &notFound{name}
	}
	vs, err := msgdkim.VerifyWithOptions(bytes.NewReader(wire), &msgdkim.VerifyOptions{LookupTXT: lookup})
	if err != nil {
		t.Fatalf("go-msgauth: %v", err)
	}
	var res []Result
	for _, v := range vs {
		res = append(res, Result{Domain: v.Domain, Go: v.Err})
	}
	if !HavePythonDKIM(t) {
		t.Log("python3-dkim not installed: go-msgauth's verifier only")
		return res
	}
	got := pythonVerify(t, wire, records)
	if len(got) != len(res) {
		t.Fatalf("python3-dkim saw %d signatures, go-msgauth %d: %q", len(got), len(res), got)
	}
	for i, r := range got {
		res[i].Selector, res[i].Python, _ = strings.Cut(r, " ")
	}
	return res
}

// Verify fails the test unless every DKIM-Signature of msg verifies with
// both verifiers, and returns them in header order (nil: none).
func Verify(t testing.TB, msg []byte, records map[string]string) []Result {
	t.Helper()
	res := Check(t, msg, records)
	for i, r := range res {
		if r.Go != nil {
			t.Errorf("go-msgauth: signature %d (d=%s): %v", i, r.Domain, r.Go)
		}
		if r.Python != "ok" && r.Python != "" {
			t.Errorf("python3-dkim: signature %d (d=%s s=%s): %s", i, r.Domain, r.Selector, r.Python)
		}
	}
	return res
}

type notFound struct{ name string }

func (e *notFound) Error() string   { return "no such TXT record: " + e.name }
func (e *notFound) Temporary() bool { return false }
func (e *notFound) Timeout() bool   { return false }

// pythonScript verifies each signature of the message on stdin with dkimpy
// and prints "<selector> ok" or "<selector> fail: ..." for each.
const pythonScript = `
import sys, json, logging, io, dkim
recs = json.loads(sys.argv[1])
msg = sys.stdin.buffer.read()
def dns(name, timeout=5):
    n = name.decode() if isinstance(name, bytes) else name
    r = recs.get(n.rstrip('.').lower())
    return r.encode() if r is not None else None
log = io.StringIO()
logger = logging.getLogger('dkimtest')
logger.addHandler(logging.StreamHandler(log))
logger.setLevel(logging.DEBUG)
d = dkim.DKIM(msg, logger=logger)
n = sum(1 for k, v in d.headers if k.lower() == b'dkim-signature')
for i in range(n):
    sig = dkim.util.parse_tag_value([v for k, v in d.headers if k.lower() == b'dkim-signature'][i])
    sel = sig.get(b's', b'?').decode()
    try:
        ok = d.verify(idx=i, dnsfunc=dns)
    except Exception as e:
        print(sel, 'fail:', repr(e)); continue
    print(sel, 'ok' if ok else 'fail: ' + log.getvalue().replace('\n', ' | '))
`

func pythonVerify(t testing.TB, wire []byte, records map[string]string) []string {
	t.Helper()
	recs, _ := json.Marshal(records)
	cmd := exec.Command(Python, "-c", pythonScript, string(recs))
	cmd.Stdin = bytes.NewReader(wire)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("python3-dkim: %v\n%s", err, out)
	}
	var lines []string
	for _, l := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		if l != "" {
			lines = append(lines, l)
		}
	}
	return lines
}
