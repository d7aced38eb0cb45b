package proc

import (
	"os"
	"strings"
	"testing"
	"time"
)

const statLine = "4242 (relay (x) y) S 1 4242 4242 0 -1 4194560 2000 0 0 0 123 45 67 8 20 0 9 0 100 2000000 3000 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0\n"

func TestParseStat(t *testing.T) {
	c, err := ParseStat([]byte(statLine))
	if err != nil {
		t.Fatal(err)
	}
	if c.Self != 168*clockTick || c.Children != 75*clockTick || c.Total() != 243*clockTick {
		t.Fatalf("%+v", c)
	}
	if d := c.Sub(CPU{Self: clockTick, Children: 2 * clockTick}); d.Self != 167*clockTick || d.Children != 73*clockTick {
		t.Fatalf("Sub: %+v", d)
	}
	for _, bad := range []string{"", "1 (x) S 1 2", strings.Replace(statLine, " 123 ", " -1 ", 1), strings.Replace(statLine, " 45 ", " x ", 1)} {
		if _, err := ParseStat([]byte(bad)); err == nil {
			t.Errorf("ParseStat(%q) succeeded", bad)
		}
	}
}

func TestParseStatus(t *testing.T) {
	m, err := ParseStatus([]byte("Name:\trelay\nVmHWM:\t   20480 kB\nVmRSS:\t   10240 kB\nThreads:\t5\n"))
	if err != nil {
		t.Fatal(err)
	}
	if m.RSS != 10<<20 || m.Peak != 20<<20 {
		t.Fatalf("%+v", m)
	}
	for _, bad := range []string{"Name:\tx\n", "VmRSS:\t1 kB\n", "VmRSS:\t1 MB\nVmHWM:\t1 kB\n", "VmRSS:\tx kB\nVmHWM:\t1 kB\n"} {
		if _, err := ParseStatus([]byte(bad)); err == nil {
			t.Errorf("ParseStatus(%q) succeeded", bad)
		}
	}
}

// TestOwnProcess reads this test's own figures: CPU only grows, memory is
// resident.
func TestOwnProcess(t *testing.T) {
	pid := os.Getpid()
	before, err := ReadCPU(pid)
	if err != nil {
		t.Fatal(err)
	}
	for end := time.Now().Add(50 * time.Millisecond); time.Now().Before(end); {
	}
	after, err := ReadCPU(pid)
	if err != nil {
		t.Fatal(err)
	}
	if after.Self < before.Self || after.Children < before.Children {
		t.Fatalf("CPU went back: %+v then %+v", before, after)
	}
	m, err := ReadMemory(pid)
	if err != nil {
		t.Fatal(err)
	}
	if m.RSS <= 0 || m.Peak < m.RSS {
		t.Fatalf("%+v", m)
	}
}

func FuzzParseStat(f *testing.F) {
	f.Add([]byte(statLine))
	f.Add([]byte("1 ()) R 0 0 0 0 0 0 0 0 0 0 1 2 3 4"))
	f.Fuzz(func(t *testing.T, b []byte) {
		c, err := ParseStat(b)
		if err == nil && (c.Self < 0 || c.Children < 0) {
			t.Fatalf("negative times %+v from %q", c, b)
		}
	})
}

func FuzzParseStatus(f *testing.F) {
	f.Add([]byte("VmHWM:\t   20480 kB\nVmRSS:\t   10240 kB\n"))
	f.Add([]byte("VmRSS: 1 kB"))
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := ParseStatus(b)
		if err == nil && (m.RSS < 0 || m.Peak < 0) {
			t.Fatalf("negative sizes %+v from %q", m, b)
		}
	})
}
