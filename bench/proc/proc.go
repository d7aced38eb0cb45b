// Package proc reads a process's CPU time and memory from Linux /proc, the
// way the benchmark harness charges work to the server under test.
package proc

import (
	"bytes"
	"fmt"
	"os"
	"strconv"
	"time"
)

// clockTick is USER_HZ, the unit of /proc/<pid>/stat times. It is 100 on
// every Linux architecture Go supports (the kernel fixes it for the ABI).
const clockTick = 10 * time.Millisecond

// CPU is a process's consumed CPU time.
type CPU struct {
	Self     time.Duration // utime+stime of the process itself
	Children time.Duration // cutime+cstime: children it has waited for
}

// Total is Self plus Children.
func (c CPU) Total() time.Duration { return c.Self + c.Children }

// Sub is c minus an earlier reading.
func (c CPU) Sub(earlier CPU) CPU {
	return CPU{Self: c.Self - earlier.Self, Children: c.Children - earlier.Children}
}

// ReadCPU reads fields 14–17 (utime, stime, cutime, cstime) of
// /proc/<pid>/stat (proc(5)).
func ReadCPU(pid int) (CPU, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return CPU{}, err
	}
	return ParseStat(b)
}

// ParseStat extracts the CPU times from the text of /proc/<pid>/stat. The
// command name (field 2) is in parentheses and may hold spaces and ')', so
// fields are counted from the last ')'.
func ParseStat(b []byte) (CPU, error) {
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return CPU{}, fmt.Errorf("proc: stat without command name")
	}
	// After ") " come fields 3 (state) onwards; utime is field 14.
	fields := bytes.Fields(b[i+1:])
	const first = 3
	if len(fields) < 17-first+1 {
		return CPU{}, fmt.Errorf("proc: stat has %d fields, want at least 17", len(fields)+first-1)
	}
	var t [4]int64
	for k := range t {
		v, err := strconv.ParseInt(string(fields[14-first+k]), 10, 64)
		if err != nil || v < 0 {
			return CPU{}, fmt.Errorf("proc: stat field %d: %q", 14+k, fields[14-first+k])
		}
		t[k] = v
	}
	return CPU{
		Self:     time.Duration(t[0]+t[1]) * clockTick,
		Children: time.Duration(t[2]+t[3]) * clockTick,
	}, nil
}

// Memory is a process's resident set, in bytes.
type Memory struct {
	RSS  int64 // VmRSS: resident now
	Peak int64 // VmHWM: the highest RSS since start or the last ResetPeak
}

// ReadMemory reads VmRSS and VmHWM from /proc/<pid>/status.
func ReadMemory(pid int) (Memory, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return Memory{}, err
	}
	return ParseStatus(b)
}

// ParseStatus extracts VmRSS and VmHWM ("VmRSS:	  1234 kB") from the
// text of /proc/<pid>/status.
func ParseStatus(b []byte) (Memory, error) {
	var m Memory
	var seen int
	for line := range bytes.Lines(b) {
		name, rest, ok := bytes.Cut(line, []byte(":"))
		if !ok {
			continue
		}
		var dst *int64
		switch string(name) {
		case "VmRSS":
			dst = &m.RSS
		case "VmHWM":
			dst = &m.Peak
		default:
			continue
		}
		f := bytes.Fields(rest)
		if len(f) != 2 || string(f[1]) != "kB" {
			return Memory{}, fmt.Errorf("proc: status %s: %q", name, bytes.TrimSpace(rest))
		}
		kb, err := strconv.ParseInt(string(f[0]), 10, 64)
		if err != nil || kb < 0 {
			return Memory{}, fmt.Errorf("proc: status %s: %q", name, f[0])
		}
		*dst = kb << 10
		seen++
	}
	if seen != 2 {
		return Memory{}, fmt.Errorf("proc: status lacks VmRSS or VmHWM")
	}
	return m, nil
}

// ResetPeak resets the process's VmHWM to its current RSS by writing 5 to
// /proc/<pid>/clear_refs (proc(5), Linux 4.0+; needs the right to ptrace it).
func ResetPeak(pid int) error {
	return os.WriteFile(fmt.Sprintf("/proc/%d/clear_refs", pid), []byte("5"), 0)
}
