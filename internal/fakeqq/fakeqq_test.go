package fakeqq

import (
	"os"
	"os/exec"
	"testing"
	"time"
)

// The fake catches a caller that writes the envelope while it still holds
// the message pipe open (qmail.c closes fd 0 first), and passes one that
// closes it first.
func TestFakeChecksTheOrder(t *testing.T) {
	bin := Build(t)
	for _, tc := range []struct {
		name       string
		closeFirst bool
		want       int
	}{{"message pipe closed first", true, 0}, {"envelope while the message pipe is open", false, 81}} {
		t.Run(tc.name, func(t *testing.T) {
			msgR, msgW, err := os.Pipe()
			if err != nil {
				t.Fatal(err)
			}
			envR, envW, err := os.Pipe()
			if err != nil {
				t.Fatal(err)
			}
			cmd := exec.Command(bin)
			cmd.Stdin, cmd.Stdout = msgR, envR
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			msgR.Close()
			envR.Close()
			msgW.Write([]byte("Subject: x\n\nbody\n"))
			if tc.closeFirst {
				msgW.Close()
			}
			envW.Write([]byte("Fa@b\x00Tc@d\x00\x00"))
			envW.Close()
			if !tc.closeFirst {
				time.Sleep(1500 * time.Millisecond) // longer than the fake's grace
				msgW.Close()
			}
			cmd.Wait()
			if got := cmd.ProcessState.ExitCode(); got != tc.want {
				t.Errorf("exit %d, want %d", got, tc.want)
			}
		})
	}
}
