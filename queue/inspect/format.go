package inspect

import (
	"fmt"
	"io"
	"strconv"
	"strings"
	"text/tabwriter"
)

// timeLayout is how queue times are printed: UTC, like qmail-qread's GMT.
const timeLayout = "2006-01-02 15:04:05"

// WriteList prints msgs as an aligned table, one message a line.
func WriteList(w io.Writer, msgs []Message) error {
	tw := tabwriter.NewWriter(w, 0, 8, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tQUEUED (UTC)\tSIZE\tLEFT\tDONE\tSENDER\tORIGIN\tSCRIPT\tSENDER-ID")
	for i := range msgs {
		m := &msgs[i]
		queued := "not yet preprocessed"
		if m.Preprocessed {
			queued = m.QueueTime.UTC().Format(timeLayout)
		}
		if m.Bouncing {
			queued += " bouncing"
		}
		fmt.Fprintf(tw, "%d\t%s\t%d\t%d\t%d\t%s\t%s\t%s\t%s\n",
			m.ID, queued, m.Size, m.Left, m.Done,
			printable("<"+m.Sender+">"), printable(OriginText(m.Origin)),
			orDash(printable(m.PHPScript)), orDash(printable(m.SenderID)))
	}
	return tw.Flush()
}

// OriginText is the origin in words: "uid 1001 (alice)",
// "network 192.0.2.7 helo=mx.example user=bob", "alias", "bounce", "unknown".
func OriginText(o Origin) string {
	switch o.Kind {
	case KindUID:
		if o.UID == nil {
			return o.Kind
		}
		s := "uid " + strconv.Itoa(*o.UID)
		if o.Account != "" {
			s += " (" + o.Account + ")"
		}
		return s
	case KindNetwork:
		var b strings.Builder
		b.WriteString("network")
		if o.IP != "" {
			b.WriteString(" " + o.IP)
		}
		if o.HELO != "" {
			b.WriteString(" helo=" + o.HELO)
		}
		if o.AuthUser != "" {
			b.WriteString(" user=" + o.AuthUser)
		}
		if o.Ident != "" {
			b.WriteString(" ident=" + o.Ident)
		}
		return b.String()
	}
	return o.Kind
}

// WriteTop prints the groups of t as two aligned tables.
func WriteTop(w io.Writer, t Top) error {
	tw := tabwriter.NewWriter(w, 0, 8, 2, ' ', 0)
	fmt.Fprintln(tw, "ORIGIN\tACCOUNT\tMESSAGES\tRECIPIENTS\tLEFT\tBYTES")
	for _, g := range t.ByOrigin {
		fmt.Fprintf(tw, "%s\t%s\t%d\t%d\t%d\t%d\n", printable(g.Key), orDash(g.Account), g.Messages, g.Recipients, g.Left, g.Bytes)
	}
	fmt.Fprintln(tw)
	fmt.Fprintln(tw, "SENDER\tMESSAGES\tRECIPIENTS\tLEFT\tBYTES")
	for _, g := range t.BySender {
		fmt.Fprintf(tw, "%s\t%d\t%d\t%d\t%d\n", printable(g.Key), g.Messages, g.Recipients, g.Left, g.Bytes)
	}
	return tw.Flush()
}

// WriteReceived prints Received fields as stored, one after the other.
func WriteReceived(w io.Writer, lines []string) error {
	for _, l := range lines {
		if _, err := io.WriteString(w, printableLines(l)+"\n"); err != nil {
			return err
		}
	}
	return nil
}

// printable replaces every byte outside 32–126 with '_', as qmail-qread
// does, so a hostile sender or header cannot drive the admin's terminal.
func printable(s string) string {
	return strings.Map(func(r rune) rune {
		if r < 32 || r > 126 {
			return '_'
		}
		return r
	}, s)
}

// printableLines is printable but keeps line ends and tabs of folded fields.
func printableLines(s string) string {
	return strings.Map(func(r rune) rune {
		if (r < 32 && r != '\n' && r != '\t') || r > 126 {
			return '_'
		}
		return r
	}, s)
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}
