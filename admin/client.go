package admin

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"

	"iapd/internal/event"
)

// ErrUnreachable means the client could not connect to the control
// socket: iapd is not running, or runs with another socket, or the socket's
// mode keeps this user out.
var ErrUnreachable = errors.New("admin: cannot reach iapd")

// APIError is an error response from iapd.
type APIError struct {
	StatusCode int
	ErrorResponse
}

func (e *APIError) Error() string { return e.ErrorResponse.Error }

// Client talks to a running iapd over its control socket. It is safe for
// concurrent use; create it with NewClient.
type Client struct {
	socket string
	http   *http.Client
}

// NewClient returns a client of the control socket at path.
func NewClient(path string) *Client {
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			c, err := d.DialContext(ctx, "unix", path)
			if err != nil {
				return nil, fmt.Errorf("%w at %s: %w", ErrUnreachable, path, err)
			}
			return c, nil
		},
		DisableCompression: true,
	}
	return &Client{socket: path, http: &http.Client{Transport: tr}}
}

// Socket returns the path of the control socket.
func (c *Client) Socket() string { return c.socket }

// do sends a request and decodes a successful JSON response into out,
// which may be nil.
func (c *Client) do(ctx context.Context, method, path string, out any) error {
	req, err := http.NewRequestWithContext(ctx, method, "http://iapd"+path, nil)
	if err != nil {
		return err
	}
	resp, err := c.http.Do(req)
	if err != nil {
		var ue *url.Error
		if errors.As(err, &ue) {
			err = ue.Err
		}
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode >= 300 {
		return decodeError(resp)
	}
	if out == nil {
		return nil
	}
	if err := json.NewDecoder(resp.Body).Decode(out); err != nil {
		return fmt.Errorf("decoding response to %s %s: %w", method, path, err)
	}
	return nil
}

func decodeError(resp *http.Response) error {
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	apiErr := &APIError{StatusCode: resp.StatusCode}
	if err := json.Unmarshal(body, &apiErr.ErrorResponse); err != nil || apiErr.ErrorResponse.Error == "" {
		apiErr.ErrorResponse.Error = fmt.Sprintf("iapd responded %s: %s", resp.Status, strings.TrimSpace(string(body)))
	}
	return apiErr
}

// Status returns GET /v1/status.
func (c *Client) Status(ctx context.Context) (*Status, error) {
	var st Status
	return &st, c.do(ctx, http.MethodGet, "/v1/status", &st)
}

// Interfaces returns GET /v1/interfaces.
func (c *Client) Interfaces(ctx context.Context) ([]InterfaceStatus, error) {
	var list []InterfaceStatus
	return list, c.do(ctx, http.MethodGet, "/v1/interfaces", &list)
}

// AccessPoints returns GET /v1/access-points.
func (c *Client) AccessPoints(ctx context.Context) ([]AccessPointStatus, error) {
	var list []AccessPointStatus
	return list, c.do(ctx, http.MethodGet, "/v1/access-points", &list)
}

// Destinations returns GET /v1/destinations.
func (c *Client) Destinations(ctx context.Context) ([]DestinationStatus, error) {
	var list []DestinationStatus
	return list, c.do(ctx, http.MethodGet, "/v1/destinations", &list)
}

// Apps returns GET /v1/apps.
func (c *Client) Apps(ctx context.Context) ([]AppStatus, error) {
	var list []AppStatus
	return list, c.do(ctx, http.MethodGet, "/v1/apps", &list)
}

// Conns returns GET /v1/connections.
func (c *Client) Conns(ctx context.Context) ([]Conn, error) {
	var list []Conn
	return list, c.do(ctx, http.MethodGet, "/v1/connections", &list)
}

// CloseConn requests iapd to close the connection with the given ID.
func (c *Client) CloseConn(ctx context.Context, id uint64) error {
	return c.do(ctx, http.MethodDelete, "/v1/connections/"+strconv.FormatUint(id, 10), nil)
}

// Explain returns what iapd would do now with a connection of app to
// target (host:port).
func (c *Client) Explain(ctx context.Context, app, target string) (*Explanation, error) {
	q := url.Values{"app": {app}, "target": {target}}
	var ex Explanation
	return &ex, c.do(ctx, http.MethodGet, "/v1/explain?"+q.Encode(), &ex)
}

// Reload requests iapd to load its policy file again. A rejected policy gives
// an *APIError whose Problems list what is wrong.
func (c *Client) Reload(ctx context.Context) (*ReloadReport, error) {
	var report ReloadReport
	return &report, c.do(ctx, http.MethodPost, "/v1/reload", &report)
}

// Events follows the event stream and calls fn with each event until ctx
// ends, fn returns an error, or iapd ends the stream. subscribed, when not
// nil, is called once the stream is open, so that a caller can read state
// knowing that no later change will be missed. It returns fn's error, or
// ctx's error, or io.ErrUnexpectedEOF when iapd went away.
func (c *Client) Events(ctx context.Context, subscribed func() error, fn func(event.Event) error) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://iapd/v1/events", nil)
	if err != nil {
		return err
	}
	resp, err := c.http.Do(req)
	if err != nil {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		var ue *url.Error
		if errors.As(err, &ue) {
			err = ue.Err
		}
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return decodeError(resp)
	}
	if subscribed != nil {
		if err := subscribed(); err != nil {
			return err
		}
	}

	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
	for sc.Scan() {
		data, ok := strings.CutPrefix(sc.Text(), "data: ")
		if !ok {
			continue // ids, comments and the blank lines between messages
		}
		var e event.Event
		if err := json.Unmarshal([]byte(data), &e); err != nil {
			return fmt.Errorf("decoding event: %w", err)
		}
		if err := fn(e); err != nil {
			return err
		}
	}
	if ctx.Err() != nil {
		return ctx.Err()
	}
	if err := sc.Err(); err != nil {
		return err
	}
	return io.ErrUnexpectedEOF
}
