// Package dnstest is a tiny authoritative DNS server for tests: TXT records
// on a loopback port, over UDP and TCP, with the failures a resolver meets
// (NXDOMAIN, SERVFAIL, silence, answers too long for UDP). It speaks just
// enough of RFC 1035 for Go's resolver and DKIM verifiers; it is ~200 lines
// that a DNS library would replace with a dependency for tests only.
package dnstest

import (
	"encoding/binary"
	"errors"
	"io"
	"net"
	"strings"
	"sync"
	"testing"
	"time"
)

// Behaviour of a name beyond its records.
const (
	Answer   = iota // the records, or NXDOMAIN when there are none
	ServFail        // SERVFAIL
	Drop            // no answer at all (the client times out)
)

// Server answers TXT queries from its records. Names are compared without
// case and without the trailing dot.
type Server struct {
	// Addr is "127.0.0.1:port", the same port for UDP and TCP.
	Addr string

	udp *net.UDPConn
	tcp *net.TCPListener
	wg  sync.WaitGroup

	mu          sync.Mutex
	txt         map[string][]string // name -> TXT records, each one string
	mode        map[string]int
	truncateUDP bool
	queries     map[string]int // "udp name" / "tcp name" -> count
}

// New starts a server on a loopback port; it stops when the test ends.
func New(t testing.TB) *Server {
	t.Helper()
	s := &Server{txt: map[string][]string{}, mode: map[string]int{}, queries: map[string]int{}}
	for attempt := 0; ; attempt++ {
		u, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
		if err != nil {
			t.Fatal(err)
		}
		tl, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: u.LocalAddr().(*net.UDPAddr).Port})
		if err != nil {
			u.Close()
			if attempt < 20 {
				continue // the TCP port is someone else's: another UDP port
			}
			t.Fatal(err)
		}
		s.udp, s.tcp, s.Addr = u, tl, u.LocalAddr().String()
		break
	}
	s.wg.Add(2)
	go s.serveUDP()
	go s.serveTCP()
	t.Cleanup(s.Close)
	return s
}

// Close stops the server.
func (s *Server) Close() {
	s.udp.Close()
	s.tcp.Close()
	s.wg.Wait()
}

// SetTXT makes name answer with these TXT records (none: NXDOMAIN). A
// record longer than 255 bytes goes out as several character-strings, as
// zone files write long DKIM keys.
func (s *Server) SetTXT(name string, records ...string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.txt[canon(name)] = records
	delete(s.mode, canon(name))
}

// SetMode makes name answer ServFail or Drop (or Answer again).
func (s *Server) SetMode(name string, mode int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.mode[canon(name)] = mode
}

// TruncateUDP makes every UDP answer that has records come back empty with
// the TC bit, so the client must ask again over TCP.
func (s *Server) TruncateUDP(on bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.truncateUDP = on
}

// Queries counts the questions for name that came over network ("udp" or
// "tcp"; "" for both).
func (s *Server) Queries(network, name string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	if network == "" {
		return s.queries["udp "+canon(name)] + s.queries["tcp "+canon(name)]
	}
	return s.queries[network+" "+canon(name)]
}

func canon(name string) string { return strings.ToLower(strings.TrimSuffix(name, ".")) }

func (s *Server) serveUDP() {
	defer s.wg.Done()
	buf := make([]byte, 4096)
	for {
		n, from, err := s.udp.ReadFromUDP(buf)
		if err != nil {
			return
		}
		if resp := s.answer(buf[:n], "udp"); resp != nil {
			s.udp.WriteToUDP(resp, from)
		}
	}
}

func (s *Server) serveTCP() {
	defer s.wg.Done()
	for {
		c, err := s.tcp.Accept()
		if err != nil {
			return
		}
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			defer c.Close()
			c.SetDeadline(time.Now().Add(10 * time.Second))
			for {
				var l [2]byte
				if _, err := io.ReadFull(c, l[:]); err != nil {
					return
				}
				q := make([]byte, binary.BigEndian.Uint16(l[:]))
				if _, err := io.ReadFull(c, q); err != nil {
					return
				}
				resp := s.answer(q, "tcp")
				if resp == nil {
					continue
				}
				out := binary.BigEndian.AppendUint16(nil, uint16(len(resp)))
				if _, err := c.Write(append(out, resp...)); err != nil {
					return
				}
			}
		}()
	}
}

const (
	typeTXT    = 16
	rcodeOK    = 0
	rcodeFail  = 2
	rcodeNX    = 3
	flagQR     = 1 << 15
	flagAA     = 1 << 10
	flagTC     = 1 << 9
	flagRD     = 1 << 8
	flagRA     = 1 << 7
	headerSize = 12
)

// answer builds the reply to one query; nil sends nothing.
func (s *Server) answer(q []byte, network string) []byte {
	name, qtype, qend, err := parseQuestion(q)
	if err != nil {
		return nil
	}
	s.mu.Lock()
	s.queries[network+" "+canon(name)]++
	mode := s.mode[canon(name)]
	records, known := s.txt[canon(name)]
	truncate := s.truncateUDP && network == "udp"
	s.mu.Unlock()
	if mode == Drop {
		return nil
	}
	flags := uint16(flagQR|flagAA|flagRA) | binary.BigEndian.Uint16(q[2:4])&flagRD
	var answers [][]byte
	switch {
	case mode == ServFail:
		flags |= rcodeFail
	case !known || len(records) == 0:
		flags |= rcodeNX
	case qtype == typeTXT && truncate:
		flags |= flagTC
	case qtype == typeTXT:
		for _, r := range records {
			answers = append(answers, txtRR(r))
		}
	}
	resp := make([]byte, headerSize, 512)
	copy(resp[0:2], q[0:2]) // id
	binary.BigEndian.PutUint16(resp[2:4], flags)
	binary.BigEndian.PutUint16(resp[4:6], 1)
	binary.BigEndian.PutUint16(resp[6:8], uint16(len(answers)))
	resp = append(resp, q[headerSize:qend]...) // the question as asked
	for _, a := range answers {
		resp = append(resp, a...)
	}
	return resp
}

// txtRR is one TXT answer for the question's name (a pointer to it), TTL
// 300, its text in character-strings of up to 255 bytes.
func txtRR(text string) []byte {
	var rdata []byte
	for first := true; first || text != ""; first = false {
		n := min(len(text), 255)
		rdata = append(rdata, byte(n))
		rdata = append(rdata, text[:n]...)
		text = text[n:]
	}
	rr := []byte{0xc0, headerSize, 0, typeTXT, 0, 1, 0, 0, 1, 44}
	rr = binary.BigEndian.AppendUint16(rr, uint16(len(rdata)))
	return append(rr, rdata...)
}

// parseQuestion reads the first question of a query: its name (dotted,
// no trailing dot), type, and where the question ends.
func parseQuestion(q []byte) (name string, qtype uint16, end int, err error) {
	if len(q) < headerSize || binary.BigEndian.Uint16(q[2:4])&flagQR != 0 || binary.BigEndian.Uint16(q[4:6]) < 1 {
		return "", 0, 0, errors.New("not a query")
	}
	var labels []string
	i := headerSize
	for {
		if i >= len(q) {
			return "", 0, 0, errors.New("short name")
		}
		l := int(q[i])
		i++
		if l == 0 {
			break
		}
		if l > 63 || i+l > len(q) {
			return "", 0, 0, errors.New("bad label")
		}
		labels = append(labels, string(q[i:i+l]))
		i += l
	}
	if i+4 > len(q) {
		return "", 0, 0, errors.New("short question")
	}
	return strings.Join(labels, "."), binary.BigEndian.Uint16(q[i : i+2]), i + 4, nil
}
