package scan

import (
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
)

// WriteReport prints rep as aligned tables: one line per process, grouped by
// uid, then connections without a process, then the home directories.
func WriteReport(w io.Writer, rep *Report) error {
	tw := tabwriter.NewWriter(w, 0, 8, 2, ' ', 0)
	if !rep.Found() {
		fmt.Fprintf(tw, "no connections to port %d\n", rep.Port)
	} else {
		fmt.Fprintln(tw, "UID\tACCOUNT\tPID\tCONNS\tREMOTE\tCWD\tCOMMAND")
		for _, g := range rep.ByUID {
			for _, p := range g.Processes {
				fmt.Fprintf(tw, "%d\t%s\t%d\t%d\t%s\t%s\t%s\n", g.UID, orDash(g.Account), p.PID, len(p.Conns),
					remotes(p.Conns), orDash(printable(p.Cwd)), orDash(printable(strings.Join(p.Cmdline, " "))))
			}
		}
		for _, s := range rep.Unowned {
			fmt.Fprintf(tw, "%d\t%s\t-\t1\t%s\t-\t(no process found)\n", s.UID, "-", remote(s.Remote.String(), s.State))
		}
		fmt.Fprintln(tw)
		for _, g := range rep.ByUID {
			fmt.Fprintf(tw, "uid %d%s: processes=%d connections=%d\n", g.UID, paren(g.Account), len(g.Processes), g.Conns)
		}
	}
	if rep.Unreadable > 0 {
		fmt.Fprintf(tw, "%d processes could not be inspected (run as root)\n", rep.Unreadable)
	}
	if len(rep.Homes) > 0 {
		fmt.Fprintln(tw)
		fmt.Fprintln(tw, "HOME\tPROCESSES\tSMTP")
		for _, h := range rep.Homes {
			fmt.Fprintf(tw, "%s\t%d\t%d\n", printable(h.Home), h.Processes, h.SMTP)
		}
	}
	return tw.Flush()
}

func remotes(conns []Conn) string {
	parts := make([]string, len(conns))
	for i, c := range conns {
		parts[i] = remote(c.Remote, c.State)
	}
	return strings.Join(parts, ",")
}

func remote(addr, state string) string {
	if state == "established" {
		return addr
	}
	return addr + "(" + state + ")"
}

func paren(s string) string {
	if s == "" {
		return ""
	}
	return " (" + s + ")"
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// printable replaces control and non-ASCII characters with '_': command
// lines and paths are chosen by whoever started the process.
func printable(s string) string {
	return strings.Map(func(r rune) rune {
		if r < 32 || r > 126 {
			return '_'
		}
		return r
	}, s)
}
