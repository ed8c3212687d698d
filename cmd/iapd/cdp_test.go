package main

import (
	"bufio"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/net/websocket"

	"iapd/internal/testbed"
)

// A browserPage is one page of headless Chromium, driven through the Chrome
// DevTools Protocol (https://chromedevtools.github.io/devtools-protocol/)
// over the browser's WebSocket. Unlike chromium --dump-dom, it reads the
// page as it changes after loading. It is not safe for concurrent use.
type browserPage struct {
	ws      *websocket.Conn
	session string // the page's session in the protocol's flat mode
	lastID  int    // ID of the last command sent
}

const (
	// devtoolsTimeout bounds each protocol command and Chromium's start.
	devtoolsTimeout = 10 * time.Second
	// devtoolsOrigin is the Origin of the WebSocket handshake. Chromium
	// rejects origins that --remote-allow-origins does not list.
	devtoolsOrigin = "http://127.0.0.1"
)

// devtoolsListening matches the line Chromium writes to stderr once its
// DevTools endpoint accepts connections.
var devtoolsListening = regexp.MustCompile(`DevTools listening on (ws://\S+)`)

// openPage starts headless Chromium in the bed's host namespace on url
// with extra flags, connects to its DevTools endpoint and attaches to the
// page. Chromium is closed when the test ends.
func openPage(t *testing.T, bed *testbed.Bed, url string, extra ...string) *browserPage {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	flags := append([]string{"--remote-debugging-port=0", "--remote-allow-origins=" + devtoolsOrigin}, extra...)
	cmd := chromiumCommand(ctx, t, bed, url, flags...)
	// Chromium's helper processes inherit stderr, so Wait stops waiting
	// for it to close a second after Chromium itself exits.
	cmd.WaitDelay = time.Second
	stderr, stderrWriter := io.Pipe()
	cmd.Stderr = stderrWriter
	if err := cmd.Start(); err != nil {
		cancel()
		t.Fatalf("starting chromium: %v", err)
	}
	exited := make(chan struct{})
	go func() {
		defer close(exited)
		cmd.Wait()
		stderrWriter.Close()
	}()

	// Chromium writes warnings to stderr as it goes. Keep them for a
	// failure report and pass on the endpoint's address.
	var (
		mu     sync.Mutex
		output strings.Builder
		read   = make(chan struct{})
		wsURL  = make(chan string, 1)
	)
	go func() {
		defer close(read)
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			mu.Lock()
			output.WriteString(sc.Text() + "\n")
			mu.Unlock()
			if m := devtoolsListening.FindStringSubmatch(sc.Text()); m != nil {
				select {
				case wsURL <- m[1]:
				default:
				}
			}
		}
		io.Copy(io.Discard, stderr)
	}()
	p := &browserPage{}
	t.Cleanup(func() {
		defer cancel()
		p.close()
		select {
		case <-exited:
		case <-time.After(5 * time.Second):
			t.Logf("chromium did not exit within 5 s of Browser.close; killing it")
			cancel()
			<-exited
		}
		<-read
		if t.Failed() {
			mu.Lock()
			t.Logf("chromium stderr:\n%s", output.String())
			mu.Unlock()
		}
	})

	var endpoint string
	select {
	case endpoint = <-wsURL:
	case <-read:
		t.Fatal("chromium exited before its DevTools endpoint listened")
	case <-time.After(devtoolsTimeout):
		t.Fatalf("chromium's DevTools endpoint did not listen within %v", devtoolsTimeout)
	}
	if err := p.connect(bed, endpoint); err != nil {
		t.Fatal(err)
	}
	if err := p.attach(); err != nil {
		t.Fatal(err)
	}
	return p
}

// connect opens the browser's WebSocket at endpoint. The endpoint listens
// on loopback in the host namespace, so the socket is made there.
func (p *browserPage) connect(bed *testbed.Bed, endpoint string) error {
	u, err := url.Parse(endpoint)
	if err != nil {
		return fmt.Errorf("parsing DevTools endpoint %q: %w", endpoint, err)
	}
	var conn net.Conn
	err = bed.Host.Do(func() (err error) {
		conn, err = net.DialTimeout("tcp", u.Host, devtoolsTimeout)
		return err
	})
	if err != nil {
		return fmt.Errorf("connecting to DevTools at %s: %w", u.Host, err)
	}
	cfg, err := websocket.NewConfig(endpoint, devtoolsOrigin)
	if err != nil {
		conn.Close()
		return fmt.Errorf("configuring DevTools WebSocket: %w", err)
	}
	p.ws, err = websocket.NewClient(cfg, conn)
	if err != nil {
		conn.Close()
		return fmt.Errorf("opening DevTools WebSocket %s: %w", endpoint, err)
	}
	return nil
}

// attach finds the page that Chromium opened on its command line and
// attaches to it, so that later commands go to that page.
func (p *browserPage) attach() error {
	deadline := time.Now().Add(devtoolsTimeout)
	for {
		var targets struct {
			TargetInfos []struct {
				TargetID string `json:"targetId"`
				Type     string `json:"type"`
			} `json:"targetInfos"`
		}
		if err := p.call("Target.getTargets", nil, &targets); err != nil {
			return err
		}
		for _, target := range targets.TargetInfos {
			if target.Type != "page" {
				continue
			}
			var attached struct {
				SessionID string `json:"sessionId"`
			}
			params := map[string]any{"targetId": target.TargetID, "flatten": true}
			if err := p.call("Target.attachToTarget", params, &attached); err != nil {
				return err
			}
			p.session = attached.SessionID
			return nil
		}
		if time.Now().After(deadline) {
			return errors.New("chromium opened no page")
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// call sends one protocol command and decodes its result into result,
// when result is not nil. Events that arrive meanwhile are dropped, since
// the tests enable no domain that sends them.
func (p *browserPage) call(method string, params, result any) error {
	p.lastID++
	msg := map[string]any{"id": p.lastID, "method": method}
	if params != nil {
		msg["params"] = params
	}
	if p.session != "" {
		msg["sessionId"] = p.session
	}
	if err := p.ws.SetDeadline(time.Now().Add(devtoolsTimeout)); err != nil {
		return err
	}
	if err := websocket.JSON.Send(p.ws, msg); err != nil {
		return fmt.Errorf("sending %s: %w", method, err)
	}
	for {
		var reply struct {
			ID     int             `json:"id"`
			Result json.RawMessage `json:"result"`
			Error  *struct {
				Code    int    `json:"code"`
				Message string `json:"message"`
			} `json:"error"`
		}
		if err := websocket.JSON.Receive(p.ws, &reply); err != nil {
			return fmt.Errorf("reading the reply to %s: %w", method, err)
		}
		if reply.ID != p.lastID {
			continue
		}
		if reply.Error != nil {
			return fmt.Errorf("%s: %s (code %d)", method, reply.Error.Message, reply.Error.Code)
		}
		if result == nil {
			return nil
		}
		if err := json.Unmarshal(reply.Result, result); err != nil {
			return fmt.Errorf("decoding the result of %s: %w", method, err)
		}
		return nil
	}
}

// evaluate runs the JavaScript expression expr in the page and returns its
// value: a string as it is, undefined as "", and anything else as JSON.
// An exception that expr throws is an error.
func (p *browserPage) evaluate(expr string) (string, error) {
	var out struct {
		Result struct {
			Type  string          `json:"type"`
			Value json.RawMessage `json:"value"`
		} `json:"result"`
		ExceptionDetails *struct {
			Text      string `json:"text"`
			Exception struct {
				Description string `json:"description"`
			} `json:"exception"`
		} `json:"exceptionDetails"`
	}
	params := map[string]any{"expression": expr, "returnByValue": true}
	if err := p.call("Runtime.evaluate", params, &out); err != nil {
		return "", err
	}
	if e := out.ExceptionDetails; e != nil {
		return "", fmt.Errorf("evaluating %s: %s %s", expr, e.Text, e.Exception.Description)
	}
	switch out.Result.Type {
	case "undefined":
		return "", nil
	case "string":
		var s string
		err := json.Unmarshal(out.Result.Value, &s)
		return s, err
	}
	return string(out.Result.Value), nil
}

// waitFor polls expr in the page until ok accepts its value, and fails t
// with the last value when five seconds pass.
func (p *browserPage) waitFor(t *testing.T, what, expr string, ok func(string) bool) {
	t.Helper()
	var (
		value string
		err   error
		met   bool
	)
	defer func() {
		if !met {
			t.Logf("last value of %s: %q, error %v", expr, value, err)
		}
	}()
	waitUntil(t, what, func() bool {
		value, err = p.evaluate(expr)
		return err == nil && ok(value)
	})
	met = true
}

// screenshot saves the page as PNG to path.
func (p *browserPage) screenshot(path string) error {
	var shot struct {
		Data string `json:"data"`
	}
	if err := p.call("Page.captureScreenshot", map[string]any{"format": "png", "captureBeyondViewport": true}, &shot); err != nil {
		return err
	}
	png, err := base64.StdEncoding.DecodeString(shot.Data)
	if err != nil {
		return fmt.Errorf("decoding screenshot: %w", err)
	}
	return os.WriteFile(path, png, 0o644)
}

// close sends Browser.close, which makes Chromium exit, and closes the
// WebSocket.
func (p *browserPage) close() {
	if p.ws == nil {
		return
	}
	p.session = "" // Browser.close goes to the browser, not the page
	p.call("Browser.close", nil, nil)
	p.ws.Close()
}
