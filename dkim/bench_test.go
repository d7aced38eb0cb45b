package dkim

import (
	"crypto"
	"io"
	"strconv"
	"strings"
	"testing"

	"relay/config"
)

// BenchmarkSign is one message's signing, spool included: 1 KiB and
// 10 MB, one RSA-2048 or Ed25519 key.
func BenchmarkSign(b *testing.B) {
	for _, size := range []int{1 << 10, 10 << 20} {
		var m strings.Builder
		m.WriteString("Received: (qmail 1 invoked by uid 1001); 5 Mar 2024 07:04:09 -0000\nFrom: <s1@d1.bench.example>\nTo: <r@rcpt.bench.example>\nSubject: bench\n\n")
		for m.Len() < size {
			m.WriteString("Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tem\n")
		}
		msg := m.String()
		for _, k := range []struct {
			name string
			key  crypto.Signer
		}{{"ed25519", ed25519Key()}, {"rsa2048", rsaKey()}} {
			b.Run(k.name+"/"+sizeName(size), func(b *testing.B) {
				s := testSet(b, config.DKIM{}, map[string]crypto.Signer{"s1@bench.example": k.key})
				keys := s.DomainKeys("bench.example")
				dir := b.TempDir()
				buf := make([]byte, 32<<10) // as a hand-off reads
				b.SetBytes(int64(len(msg)))
				b.ReportAllocs()
				for b.Loop() {
					g, err := s.NewSigning(keys, dir, 0)
					if err != nil {
						b.Fatal(err)
					}
					g.ReadFrom(struct{ io.Reader }{strings.NewReader(msg)})
					r, signErr, err := g.Finish()
					if err != nil || signErr != nil {
						b.Fatal(err, signErr)
					}
					for {
						if _, err := r.Read(buf); err != nil {
							break
						}
					}
					g.Close()
				}
			})
		}
	}
}

func sizeName(n int) string {
	if n >= 1<<20 {
		return strconv.Itoa(n>>20) + "MB"
	}
	return strconv.Itoa(n>>10) + "KiB"
}
