package loadgen

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"relay/bench/proc"
)

// ExecConfig is a local-injection run: a qmail-queue-protocol program
// (relay qq, or the stand-in called directly) run once per message, as
// qmail-inject runs qmail-queue.
type ExecConfig struct {
	Argv      []string      // the program and its arguments
	Env       []string      // extra environment
	Conns     int           // programs running at once
	Messages  int           // messages in all; 0: until Duration
	Duration  time.Duration // stop starting messages after this
	Size      int           // message bytes (LF line ends, as qmail stores it)
	Rcpts     int
	Senders   int
	Domains   int
	Timeout   time.Duration // each program is killed after this (default 30s)
	ServerPID int           // >0: the daemon the program asks; its CPU is charged too
}

// ExecResult is what a local-injection run measured. CPU is per accepted
// message in µs: the programs run (reaped children of this process:
// getrusage RUSAGE_CHILDREN) and the daemon.
type ExecResult struct {
	// Summary counts exit 0 as accepted, 71 and other temporary codes as
	// deferred, 31 and other permanent codes as rejected, a program that
	// could not run or was killed as an error.
	Summary
	CPUProgramUs float64 `json:"cpu_program_us"`
	CPUServerUs  float64 `json:"cpu_server_us"`
	CPUUs        float64 `json:"cpu_us"`
}

// RunExec runs the program once per message and measures it.
func RunExec(cfg ExecConfig) (ExecResult, error) {
	if len(cfg.Argv) == 0 {
		return ExecResult{}, errors.New("loadgen: no program to run")
	}
	if cfg.Messages <= 0 && cfg.Duration <= 0 {
		return ExecResult{}, errors.New("loadgen: need Messages or Duration")
	}
	cfg.Conns = max(cfg.Conns, 1)
	cfg.Rcpts = max(cfg.Rcpts, 1)
	cfg.Senders = max(cfg.Senders, 1)
	cfg.Domains = max(cfg.Domains, 1)
	if cfg.Timeout <= 0 {
		cfg.Timeout = 30 * time.Second
	}
	body := storedBody(cfg.Size)
	env := append(os.Environ(), cfg.Env...)

	var serverBefore proc.CPU
	if cfg.ServerPID > 0 {
		var err error
		if serverBefore, err = proc.ReadCPU(cfg.ServerPID); err != nil {
			return ExecResult{}, err
		}
	}
	childBefore := childrenCPU()
	var next atomic.Int64
	start := time.Now()
	deadline := time.Time{}
	if cfg.Duration > 0 {
		deadline = start.Add(cfg.Duration)
	}
	tallies := make([]*tally, cfg.Conns)
	var wg sync.WaitGroup
	for i := range tallies {
		t := &tally{}
		tallies[i] = t
		wg.Go(func() {
			for {
				if !deadline.IsZero() && !time.Now().Before(deadline) {
					return
				}
				n := int(next.Add(1) - 1)
				if cfg.Messages > 0 && n >= cfg.Messages {
					return
				}
				t0 := time.Now()
				o, err := runOnce(&cfg, env, body, n)
				t.record(o, time.Since(t0), err)
			}
		})
	}
	wg.Wait()
	elapsed := time.Since(start)

	res := ExecResult{Summary: summarize(tallies, elapsed)}
	if res.Accepted > 0 {
		n := float64(res.Accepted)
		res.CPUProgramUs = us(childrenCPU()-childBefore) / n
		if cfg.ServerPID > 0 {
			after, err := proc.ReadCPU(cfg.ServerPID)
			if err != nil {
				return res, err
			}
			res.CPUServerUs = us(after.Sub(serverBefore).Total()) / n
		}
		res.CPUUs = res.CPUProgramUs + res.CPUServerUs
	}
	return res, nil
}

// childrenCPU is the user+system time of this process's reaped children.
func childrenCPU() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_CHILDREN, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// storedBody is a message in qmail's stored form (LF line ends) of about size bytes.
func storedBody(size int) []byte {
	var b bytes.Buffer
	b.WriteString("From: <bench@bench.example>\nTo: <r@rcpt.bench.example>\nSubject: local bench\n\n")
	line := bodyLine[:len(bodyLine)-2] + "\n"
	for b.Len()+len(line) <= size {
		b.WriteString(line)
	}
	return b.Bytes()
}

// runOnce runs the program for message n: the message on fd 0, the
// envelope (qmail-queue(8): F sender NUL, T rcpt NUL each, NUL) on fd 1.
func runOnce(cfg *ExecConfig, env []string, body []byte, n int) (outcome, error) {
	envelope := []byte("F" + SenderAddr(n%cfg.Senders, cfg.Domains) + "\x00")
	for i := range cfg.Rcpts {
		envelope = append(envelope, "T"+rcptAddr(n, i, "rcpt.bench.example")+"\x00"...)
	}
	envelope = append(envelope, 0)
	envR, envW, err := os.Pipe()
	if err != nil {
		return failed, err
	}
	defer envR.Close()
	// The envelope is far smaller than a pipe's buffer: write it whole now.
	_, err = envW.Write(envelope)
	envW.Close()
	if err != nil {
		return failed, err
	}
	cmd := exec.Command(cfg.Argv[0], cfg.Argv[1:]...)
	cmd.Env = env
	cmd.Stdin = bytes.NewReader(body)
	cmd.Stdout = envR
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	cmd.WaitDelay = time.Second
	if err := cmd.Start(); err != nil {
		return failed, err
	}
	timer := time.AfterFunc(cfg.Timeout, func() { cmd.Process.Kill() })
	err = cmd.Wait()
	timer.Stop()
	if err == nil {
		return accepted, nil
	}
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() < 0 {
		return failed, err
	}
	err = fmt.Errorf("%s: exit %d: %s", cfg.Argv[0], ee.ExitCode(), bytes.TrimSpace(stderr.Bytes()))
	// qmail-queue(8): 11–40 permanent, 51–81 (and others) temporary.
	if c := ee.ExitCode(); c >= 11 && c <= 40 {
		return rejected, err
	}
	return deferred, err
}
