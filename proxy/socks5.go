package proxy

import (
	"context"
	"errors"
	"log"
	"log/slog"
	"net"
	"time"

	socks5 "github.com/armon/go-socks5"

	"iapd/internal/logkey"
	"iapd/policy"
)

// socks5Frontend serves the SOCKS5 clients of one listener with
// github.com/armon/go-socks5. Only CONNECT is served, because the library
// replies "command not supported" to BIND and UDP ASSOCIATE.
type socks5Frontend struct {
	s         *Server
	l         *policy.Listener
	logger    *slog.Logger
	libLogger *log.Logger // the library's log lines, at Debug
}

func (s *Server) newSOCKS5Frontend(l *policy.Listener) *socks5Frontend {
	logger := s.logger.With(logkey.Listener, l.Listen)
	return &socks5Frontend{
		s:         s,
		l:         l,
		logger:    logger,
		libLogger: slog.NewLogLogger(logger.Handler(), slog.LevelDebug),
	}
}

// serveConn serves one client connection until its tunnel ends. The
// handshake deadline holds until the upstream is dialled.
func (f *socks5Frontend) serveConn(c net.Conn) {
	c.SetDeadline(time.Now().Add(f.s.cfg.HandshakeTimeout))
	sess := &socks5Session{f: f, client: newClientConn(c)}

	// The library builds nothing costly, and a server per connection lets
	// the credential store, rules and dial hook share this client's state.
	lib, err := socks5.New(&socks5.Config{
		AuthMethods: f.authMethods(sess),
		Resolver:    deferredResolver{},
		Rules:       sess,
		Logger:      f.libLogger,
		Dial:        sess.dial,
	})
	if err != nil {
		f.logger.Error("creating SOCKS5 server failed", logkey.Err, err, "unexpected", true)
		return
	}
	if err := lib.ServeConn(sess.client); err != nil {
		f.logger.Debug("socks5 session ended", logkey.Client, c.RemoteAddr().String(), logkey.Err, err)
	}
}

// authMethods returns the methods offered to a client. A listener with
// users offers only user name and password, so that a client that also
// offers "no authentication" is still asked for credentials. A listener of
// one app accepts both, and ignores any credentials sent.
func (f *socks5Frontend) authMethods(sess *socks5Session) []socks5.Authenticator {
	userPass := socks5.UserPassAuthenticator{Credentials: sess}
	if f.l.HasUsers() {
		return []socks5.Authenticator{userPass}
	}
	return []socks5.Authenticator{socks5.NoAuthAuthenticator{}, userPass}
}

// socks5Session is the state of one SOCKS5 client connection. It is the
// library's credential store and rule set for that connection.
type socks5Session struct {
	f      *socks5Frontend
	client *clientConn
	app    *policy.App // identified by Valid; nil until then
	choice string      // access point or destination chosen in the user name; "" for none
}

// Valid reports whether the credentials identify an app on the listener,
// and remembers that app and the client's choice.
func (sess *socks5Session) Valid(user, password string) bool {
	app, choice, err := sess.f.l.Identify(user, policy.Password(password), true)
	if err != nil {
		sess.f.logger.Debug("credentials rejected", logkey.Client, sess.client.RemoteAddr().String(), logkey.Err, err)
		return false
	}
	sess.app = app
	sess.choice = choice
	return true
}

// Allow identifies the app and stores it in the context that the library
// passes on to dial. It refuses, which the library answers with reply 0x02
// (connection not allowed by ruleset), when the policy refuses the target
// or the client's choice, and when there is no app, which a listener of one
// app only lacks when misconfigured.
func (sess *socks5Session) Allow(ctx context.Context, req *socks5.Request) (context.Context, bool) {
	app := sess.app
	if app == nil && !sess.f.l.HasUsers() {
		app = sess.f.l.App
	}
	if app == nil {
		sess.f.logger.Debug("client rejected: listener has no app", logkey.Client, sess.client.RemoteAddr().String())
		return ctx, false
	}

	target := req.DestAddr.Address()
	if err := policy.Refusal(app, target, sess.choice); err != nil {
		sess.f.logger.Info("connection refused by policy", logkey.App, app.Name, logkey.Target, target,
			"choice", sess.choice, logkey.Err, err)
		return ctx, false
	}
	return context.WithValue(ctx, appKey{}, socks5Client{app: app, choice: sess.choice}), true
}

type appKey struct{}

// socks5Client is what Allow passes on to dial through the context.
type socks5Client struct {
	app    *policy.App
	choice string
}

// dial dials the request's target for the app that Allow stored in ctx.
// The error it returns carries only the phrase that makes the library send
// the matching reply code; the full error goes to the log.
func (sess *socks5Session) dial(ctx context.Context, _, address string) (net.Conn, error) {
	client, _ := ctx.Value(appKey{}).(socks5Client)
	app := client.app
	if app == nil {
		// Allow runs before every dial, so this is a programming error.
		sess.f.logger.Error("dial without app", logkey.Target, address, "unexpected", true)
		return nil, errors.New(failureHostUnreachable.String())
	}

	ctx, cancel := sess.f.s.dialContext(ctx)
	defer cancel()
	up, err := sess.f.s.dial(ctx, app, client.choice, sess.f.l, address)
	if err != nil {
		sess.f.logger.Debug("dial failed", logkey.App, app.Name, logkey.Target, address, logkey.Err, err)
		// Give the failure reply its own time, as the dial may have used
		// up the handshake's.
		sess.client.SetDeadline(time.Now().Add(sess.f.s.cfg.HandshakeTimeout))
		return nil, errors.New(classify(err).String())
	}

	// The tunnel may stay idle for as long as its ends like.
	sess.client.SetDeadline(time.Time{})
	return up, nil
}

// deferredResolver leaves names to the dial: the library resolves before
// the app is known and with the system resolver, while iapd must resolve
// with the resolver of the access point the connection leaves through.
// With no address, the library's AddrSpec.Address returns name:port.
type deferredResolver struct{}

func (deferredResolver) Resolve(ctx context.Context, _ string) (context.Context, net.IP, error) {
	return ctx, nil, nil
}
