package config

import "testing"

// TestRcptHostAllowedASCIIFold: only A-Z fold, as in qmail's case_lowerb.
// strings.ToLower maps U+212A KELVIN SIGN to 'k', which would accept a
// foreign domain as a local one.
func TestRcptHostAllowedASCIIFold(t *testing.T) {
	c := NewControl(&Config{Relay: Relay{LocalDomains: []string{"kelvin.test", ".kk.test"}}})
	for d, want := range map[string]bool{
		"KELVIN.test":           true,
		"mx.KK.TEST":            true,
		"\u212Aelvin.test":      false,
		"mx.\u212A\u212A.test":  false,
		"\u212Aelvin.test.evil": false,
	} {
		if got := c.RcptHostAllowed(d); got != want {
			t.Errorf("RcptHostAllowed(%q) = %v, want %v", d, got, want)
		}
	}
}
