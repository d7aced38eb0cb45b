package inspect

import (
	"cmp"
	"slices"
	"strconv"
	"strings"
)

// Group is the messages in the queue that share one origin or one sender.
type Group struct {
	Key        string `json:"key"`               // uid:<n>, user:<login>, ip:<addr>, alias, bounce, unknown; or sender:<addr>
	Account    string `json:"account,omitempty"` // for uid:<n>
	Messages   int    `json:"messages"`
	Recipients int    `json:"recipients"` // left and done
	Left       int    `json:"left"`
	Bytes      int64  `json:"bytes"`
}

// Top is the queue summarised by origin and, separately, by envelope sender.
type Top struct {
	ByOrigin []Group `json:"by_origin"`
	BySender []Group `json:"by_sender"`
}

// OriginKey is the group a message's origin belongs to: uid:<n> for a local
// injection ("invoked by uid"), user:<login> for an authenticated SMTP
// client, ip:<addr> for an unauthenticated one, else the origin's kind.
func OriginKey(o Origin) string {
	switch {
	case o.Kind == KindUID && o.UID != nil:
		return "uid:" + strconv.Itoa(*o.UID)
	case o.Kind == KindNetwork && o.AuthUser != "":
		return "user:" + o.AuthUser
	case o.Kind == KindNetwork && o.IP != "":
		return "ip:" + o.IP
	}
	return o.Kind
}

// SenderKey is the group of an envelope sender: sender:<addr>, lowercased,
// and sender:<> for the null sender (the identity ids of docs/design.md §3).
func SenderKey(sender string) string {
	return "sender:" + cmp.Or(strings.ToLower(sender), "<>")
}

// Summarize groups msgs and keeps the n largest groups of each kind (all
// when n <= 0). Largest means most recipients still to deliver, then most
// messages: a spam run in progress comes first.
func Summarize(msgs []Message, n int) Top {
	byOrigin := make(map[string]*Group)
	bySender := make(map[string]*Group)
	for i := range msgs {
		m := &msgs[i]
		g := add(byOrigin, OriginKey(m.Origin), m)
		if g.Account == "" {
			g.Account = m.Origin.Account
		}
		add(bySender, SenderKey(m.Sender), m)
	}
	return Top{ByOrigin: largest(byOrigin, n), BySender: largest(bySender, n)}
}

func add(groups map[string]*Group, key string, m *Message) *Group {
	g := groups[key]
	if g == nil {
		g = &Group{Key: key}
		groups[key] = g
	}
	g.Messages++
	g.Recipients += m.Left + m.Done
	g.Left += m.Left
	g.Bytes += m.Size
	return g
}

func largest(groups map[string]*Group, n int) []Group {
	out := make([]Group, 0, len(groups))
	for _, g := range groups {
		out = append(out, *g)
	}
	slices.SortFunc(out, func(a, b Group) int {
		return cmp.Or(
			cmp.Compare(b.Left, a.Left),
			cmp.Compare(b.Messages, a.Messages),
			cmp.Compare(a.Key, b.Key))
	})
	if n > 0 && len(out) > n {
		out = out[:n]
	}
	return out
}
