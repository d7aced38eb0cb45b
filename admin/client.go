package admin

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"strings"
	"time"

	"relay/queue"
)

// Client drives the admin API (relay ctl).
type Client struct {
	BaseURL string // "http://127.0.0.1:8025"
	Token   string
	HTTP    *http.Client
}

// clientTimeout bounds one request of relay ctl; a release waits for the
// hand-off, which has its own timeout below this.
const clientTimeout = 5 * time.Minute

// NewClient makes a client for the API at admin.listen. A wildcard host
// (0.0.0.0, ::, empty) is reached on loopback. With tlsCert (the daemon's
// admin.tls_cert) it speaks HTTPS and trusts exactly the certificate that
// file starts with, whatever names or issuer it has: relay ctl runs beside
// the daemon and reads the same file, so the name the API is reached by
// (often 127.0.0.1) need not be in the certificate, and a self-signed one
// works without a CA.
func NewClient(listen, token, tlsCert string) (*Client, error) {
	host, port, err := net.SplitHostPort(listen)
	if err != nil {
		return nil, fmt.Errorf("admin.listen %q: %v", listen, err)
	}
	switch host {
	case "", "0.0.0.0":
		host = "127.0.0.1"
	case "::":
		host = "::1"
	}
	c := &Client{
		BaseURL: "http://" + net.JoinHostPort(host, port),
		Token:   token,
		HTTP:    &http.Client{Timeout: clientTimeout},
	}
	if tlsCert != "" {
		pinned, err := readLeaf(tlsCert)
		if err != nil {
			return nil, fmt.Errorf("admin.tls_cert: %w", err)
		}
		c.BaseURL = "https://" + net.JoinHostPort(host, port)
		c.HTTP.Transport = &http.Transport{
			Proxy: nil, // the daemon is local: never through a proxy
			TLSClientConfig: &tls.Config{
				MinVersion: tls.VersionTLS12,
				// Chain and name checks are replaced by the pin below.
				InsecureSkipVerify: true,
				VerifyConnection: func(cs tls.ConnectionState) error {
					if len(cs.PeerCertificates) == 0 || !bytes.Equal(cs.PeerCertificates[0].Raw, pinned) {
						return errors.New("the admin API's certificate is not the one in admin.tls_cert")
					}
					return nil
				},
			},
		}
	}
	return c, nil
}

// readLeaf returns the DER bytes of the first certificate in a PEM file.
func readLeaf(path string) ([]byte, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	for {
		var blk *pem.Block
		blk, b = pem.Decode(b)
		if blk == nil {
			return nil, fmt.Errorf("%s: no CERTIFICATE block", path)
		}
		if blk.Type == "CERTIFICATE" {
			return blk.Bytes, nil
		}
	}
}

// StatusError is an answer other than 200 from the API.
type StatusError struct {
	Code    int
	Message string // the JSON error text
}

func (e *StatusError) Error() string {
	return fmt.Sprintf("%d %s: %s", e.Code, http.StatusText(e.Code), e.Message)
}

// do sends one request and returns the body of a 200 answer.
func (c *Client) do(ctx context.Context, method, path string, form url.Values) (io.ReadCloser, error) {
	var body io.Reader
	if form != nil {
		body = strings.NewReader(form.Encode())
	}
	req, err := http.NewRequestWithContext(ctx, method, c.BaseURL+path, body)
	if err != nil {
		return nil, err
	}
	if form != nil {
		req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	}
	req.Header.Set("Authorization", "Bearer "+c.Token)
	resp, err := c.HTTP.Do(req)
	if err != nil {
		return nil, err
	}
	if resp.StatusCode == http.StatusOK {
		return resp.Body, nil
	}
	defer resp.Body.Close()
	var e apiError
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	if json.Unmarshal(b, &e) != nil || e.Error == "" {
		e.Error = strings.TrimSpace(string(b))
	}
	return nil, &StatusError{Code: resp.StatusCode, Message: e.Error}
}

func (c *Client) getJSON(ctx context.Context, method, path string, form url.Values, v any) error {
	body, err := c.do(ctx, method, path, form)
	if err != nil {
		return err
	}
	defer body.Close()
	if err := json.NewDecoder(body).Decode(v); err != nil {
		return fmt.Errorf("reading %s: %w", path, err)
	}
	return nil
}

// Senders lists senders in a state (ok, throttled, suspended, all).
func (c *Client) Senders(ctx context.Context, state string) ([]Sender, error) {
	var out []Sender
	err := c.getJSON(ctx, http.MethodGet, "/api/senders?"+url.Values{"state": {state}}.Encode(), nil, &out)
	return out, err
}

// Sender returns one sender with its recent events.
func (c *Client) Sender(ctx context.Context, id string) (Sender, error) {
	var out Sender
	err := c.getJSON(ctx, http.MethodGet, "/api/senders/"+url.PathEscape(id), nil, &out)
	return out, err
}

func (c *Client) act(ctx context.Context, path string, form url.Values) (ActionResult, error) {
	if form == nil {
		form = url.Values{}
	}
	var out ActionResult
	err := c.getJSON(ctx, http.MethodPost, path, form, &out)
	return out, err
}

// Suspend suspends an identity; reason may be empty.
func (c *Client) Suspend(ctx context.Context, id, reason string) (ActionResult, error) {
	form := url.Values{}
	if reason != "" {
		form.Set("reason", reason)
	}
	return c.act(ctx, "/api/senders/"+url.PathEscape(id)+"/suspend", form)
}

// Unsuspend lifts a suspension.
func (c *Client) Unsuspend(ctx context.Context, id string) (ActionResult, error) {
	return c.act(ctx, "/api/senders/"+url.PathEscape(id)+"/unsuspend", nil)
}

// Reset forgets an identity's counters.
func (c *Client) Reset(ctx context.Context, id string) (ActionResult, error) {
	return c.act(ctx, "/api/senders/"+url.PathEscape(id)+"/reset", nil)
}

// Held lists the hold spool, newest first.
func (c *Client) Held(ctx context.Context) ([]HeldSummary, error) {
	var out []HeldSummary
	err := c.getJSON(ctx, http.MethodGet, "/api/held", nil, &out)
	return out, err
}

// Queues returns the release queues (GET /api/queue).
func (c *Client) Queues(ctx context.Context) ([]queue.ReleaseQueue, error) {
	var out []queue.ReleaseQueue
	err := c.getJSON(ctx, http.MethodGet, "/api/queue", nil, &out)
	return out, err
}

// HeldMessage returns one held message's envelope and header.
func (c *Client) HeldMessage(ctx context.Context, id string) (HeldMessage, error) {
	var out HeldMessage
	err := c.getJSON(ctx, http.MethodGet, "/api/held/"+url.PathEscape(id), nil, &out)
	return out, err
}

// HeldRaw copies one held message, as stored, to w.
func (c *Client) HeldRaw(ctx context.Context, id string, w io.Writer) error {
	body, err := c.do(ctx, http.MethodGet, "/api/held/"+url.PathEscape(id)+"?raw=1", nil)
	if err != nil {
		return err
	}
	defer body.Close()
	_, err = io.Copy(w, body)
	return err
}

// Release hands a held message off with its original envelope.
func (c *Client) Release(ctx context.Context, id string) (ActionResult, error) {
	return c.act(ctx, "/api/held/"+url.PathEscape(id)+"/release", nil)
}

// Delete removes a held message for good.
func (c *Client) Delete(ctx context.Context, id string) (ActionResult, error) {
	return c.act(ctx, "/api/held/"+url.PathEscape(id)+"/delete", nil)
}

// Events reads the event log, newest first.
func (c *Client) Events(ctx context.Context, f EventFilter) ([]Event, error) {
	q := url.Values{}
	if f.Identity != "" {
		q.Set("identity", f.Identity)
	}
	if f.Kind != "" {
		q.Set("kind", f.Kind)
	}
	if f.Limit > 0 {
		q.Set("limit", strconv.Itoa(f.Limit))
	}
	var out []Event
	err := c.getJSON(ctx, http.MethodGet, "/api/events?"+q.Encode(), nil, &out)
	return out, err
}

// Reload makes the daemon re-read its config; a bad file's errors come
// back in the *StatusError.
func (c *Client) Reload(ctx context.Context) (ActionResult, error) {
	return c.act(ctx, "/api/reload", nil)
}

// Health checks /healthz.
func (c *Client) Health(ctx context.Context) error {
	body, err := c.do(ctx, http.MethodGet, "/healthz", nil)
	if err != nil {
		return err
	}
	body.Close()
	return nil
}
