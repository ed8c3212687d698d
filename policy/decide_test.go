package policy

import (
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"strings"
	"testing"
	"time"

	"golang.org/x/crypto/bcrypt"
)

// identifyPolicy has a port listener and a credential listener with one
// bcrypt user and one environment user.
func identifyPolicy(t *testing.T) *Policy {
	t.Helper()
	// The lowest cost keeps the test fast; the cost does not change what
	// CheckPassword accepts.
	hash, err := bcrypt.GenerateFromPassword([]byte("alice-password"), bcrypt.MinCost)
	if err != nil {
		t.Fatal(err)
	}
	setEnv(t, map[string]string{"IAPD_BOB": "bob-password"})
	p, err := Parse("identify.yaml", []byte(`
listeners:
  - listen: "127.0.0.1:0"
    app: browser
  - listen: "127.0.0.1:0"
    users:
      - name: alice
        password_hash: "`+string(hash)+`"
        app: mail
      - name: bob
        password_env: IAPD_BOB
        app: browser
apps:
  browser: {access_point: host}
  mail: {access_point: host}
access_points:
  host: {interface: default, dns: system}
`))
	if err != nil {
		t.Fatalf("Parse: %v", err)
	}
	return p
}

func TestListenerIdentify(t *testing.T) {
	p := identifyPolicy(t)
	port, creds := p.Listeners[0], p.Listeners[1]

	tests := []struct {
		name       string
		listener   *Listener
		user       string
		password   string
		hasCreds   bool
		wantApp    string
		wantChoice string
		wantErr    error
	}{
		{name: "port listener without credentials", listener: port, wantApp: "browser"},
		{name: "port listener ignores credentials", listener: port, user: "alice", password: "wrong", hasCreds: true, wantApp: "browser"},
		{name: "bcrypt user right password", listener: creds, user: "alice", password: "alice-password", hasCreds: true, wantApp: "mail"},
		{name: "bcrypt user right password again", listener: creds, user: "alice", password: "alice-password", hasCreds: true, wantApp: "mail"},
		{name: "bcrypt user wrong password", listener: creds, user: "alice", password: "bob-password", hasCreds: true, wantErr: ErrBadCredentials},
		{name: "bcrypt user empty password", listener: creds, user: "alice", password: "", hasCreds: true, wantErr: ErrBadCredentials},
		{name: "env user right password", listener: creds, user: "bob", password: "bob-password", hasCreds: true, wantApp: "browser"},
		{name: "env user wrong password", listener: creds, user: "bob", password: "bob-passwor", hasCreds: true, wantErr: ErrBadCredentials},
		{name: "env user password prefix", listener: creds, user: "bob", password: "bob-password-and-more", hasCreds: true, wantErr: ErrBadCredentials},
		{name: "unknown user", listener: creds, user: "carol", password: "bob-password", hasCreds: true, wantErr: ErrBadCredentials},
		{name: "user names are case sensitive", listener: creds, user: "Alice", password: "alice-password", hasCreds: true, wantErr: ErrBadCredentials},
		{name: "empty user name", listener: creds, user: "", password: "", hasCreds: true, wantErr: ErrBadCredentials},
		{name: "no credentials", listener: creds, wantErr: ErrCredentialsRequired},
		{name: "user with choice", listener: creds, user: "alice+cell", password: "alice-password", hasCreds: true, wantApp: "mail", wantChoice: "cell"},
		{name: "user with choice wrong password", listener: creds, user: "alice+cell", password: "wrong", hasCreds: true, wantErr: ErrBadCredentials},
		{name: "unknown user with choice", listener: creds, user: "carol+cell", password: "x", hasCreds: true, wantErr: ErrBadCredentials},
		{name: "port listener app name with choice", listener: port, user: "browser+wifi", password: "anything", hasCreds: true, wantApp: "browser", wantChoice: "wifi"},
		{name: "port listener other name with plus", listener: port, user: "alice+wifi", password: "anything", hasCreds: true, wantApp: "browser"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			app, choice, err := tt.listener.Identify(tt.user, Password(tt.password), tt.hasCreds)
			if tt.wantErr != nil {
				if !errors.Is(err, tt.wantErr) {
					t.Fatalf("Identify error = %v, want %v", err, tt.wantErr)
				}
				if app != nil {
					t.Errorf("Identify returned app %q with an error", app.Name)
				}
				return
			}
			if err != nil {
				t.Fatalf("Identify: %v", err)
			}
			if app != p.Apps[tt.wantApp] {
				t.Errorf("app = %v, want %s", app, tt.wantApp)
			}
			if choice != tt.wantChoice {
				t.Errorf("choice = %q, want %q", choice, tt.wantChoice)
			}
		})
	}
}

func TestErrorTexts(t *testing.T) {
	tests := []struct {
		name string
		err  error
		want string
	}{
		{"credentials required", ErrCredentialsRequired, "policy: credentials required"},
		{"bad credentials", ErrBadCredentials, "policy: invalid user name or password"},
		{"no usable access point", ErrNoUsableAccessPoint, "policy: no usable access point"},
		{"not allowed", ErrNotAllowed, "policy: connection not allowed"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if tt.err.Error() != tt.want {
				t.Errorf("Error() = %q, want %q", tt.err.Error(), tt.want)
			}
		})
	}
}

// mapUsability lists the access points that are not usable, with the
// reason; the others are, for both families. It is Conditions with no
// hold-downs, no latencies and no link facts.
type mapUsability map[string]string

func (m mapUsability) Status(ap *AccessPoint) Status {
	return (&fakeConditions{down: m}).Status(ap)
}

func (m mapUsability) Now() time.Time                    { return time.Time{} }
func (m mapUsability) Current(*Destination) *AccessPoint { return nil }
func (m mapUsability) Turn(*Destination) uint64          { return 0 }

// fakeConditions is Conditions over fixed tables. An access point is
// usable for both families, with an unlisted interface, unless down or
// status says otherwise.
type fakeConditions struct {
	down    mapUsability
	status  map[string]Status // by access point name; replaces the default
	now     time.Time
	current map[string]*AccessPoint // by destination name
	turn    uint64
}

func (f *fakeConditions) Status(ap *AccessPoint) Status {
	st, ok := f.status[ap.Name]
	if !ok {
		st = Status{Usable: true, IPv4: true, IPv6: true, Link: Link{Interface: ap.Interface}}
	}
	if reason, down := f.down[ap.Name]; down {
		st.Usable, st.Reason = false, reason
	}
	return st
}

func (f *fakeConditions) Now() time.Time { return f.now }

func (f *fakeConditions) Current(d *Destination) *AccessPoint { return f.current[d.Name] }

func (f *fakeConditions) Turn(d *Destination) uint64 {
	f.turn++
	return f.turn - 1
}

func TestNewPlan(t *testing.T) {
	setEnv(t, nil)
	p, err := Parse("plan.yaml", []byte(`
listeners:
  - listen: "127.0.0.1:0"
    app: browser
apps:
  browser: {destination: internet}
  mms: {access_point: cell}
access_points:
  wifi: {interface: wlan0, dns: [192.0.2.53]}
  cell: {interface: wwan0, dns: [198.51.100.53]}
  host: {interface: default, dns: system}
destinations:
  internet:
    access_points: [cell, wifi, host]
`))
	if err != nil {
		t.Fatalf("Parse: %v", err)
	}

	tests := []struct {
		name           string
		app            string
		down           mapUsability
		wantCandidates []string
		wantUnusable   []string
		wantErr        string
	}{
		{
			name:           "all usable in destination order",
			app:            "browser",
			wantCandidates: []string{"cell", "wifi", "host"},
		},
		{
			name:           "first down",
			app:            "browser",
			down:           mapUsability{"cell": "interface wwan0 is down"},
			wantCandidates: []string{"wifi", "host"},
			wantUnusable:   []string{"cell: interface wwan0 is down"},
		},
		{
			name:           "only last usable",
			app:            "browser",
			down:           mapUsability{"cell": "interface wwan0 is down", "wifi": "no IPv4 address"},
			wantCandidates: []string{"host"},
			wantUnusable:   []string{"cell: interface wwan0 is down", "wifi: no IPv4 address"},
		},
		{
			name:         "none usable",
			app:          "browser",
			down:         mapUsability{"cell": "interface wwan0 is down", "wifi": "no IPv4 address", "host": "no default route"},
			wantUnusable: []string{"cell: interface wwan0 is down", "wifi: no IPv4 address", "host: no default route"},
			wantErr:      `destination "internet": policy: no usable access point (cell: interface wwan0 is down; wifi: no IPv4 address; host: no default route)`,
		},
		{
			name:           "implicit destination usable",
			app:            "mms",
			down:           mapUsability{"wifi": "no IPv4 address"},
			wantCandidates: []string{"cell"},
		},
		{
			name:         "implicit destination down",
			app:          "mms",
			down:         mapUsability{"cell": "health probe failed"},
			wantUnusable: []string{"cell: health probe failed"},
			wantErr:      `destination "cell": policy: no usable access point (cell: health probe failed)`,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			app := p.Apps[tt.app]
			plan := NewPlan(app, "example.com:443", &fakeConditions{down: tt.down})

			if plan.App != app || plan.Destination != app.Destination {
				t.Errorf("plan app %v destination %v, want %s and its destination", plan.App, plan.Destination, tt.app)
			}
			if got := names(plan.Candidates); !equalStrings(got, tt.wantCandidates) {
				t.Errorf("candidates = %v, want %v", got, tt.wantCandidates)
			}
			var unusable []string
			for _, u := range plan.Unusable {
				unusable = append(unusable, u.AccessPoint.Name+": "+u.Reason)
			}
			if !equalStrings(unusable, tt.wantUnusable) {
				t.Errorf("unusable = %v, want %v", unusable, tt.wantUnusable)
			}

			err := plan.Err()
			if tt.wantErr == "" {
				if err != nil {
					t.Errorf("Err() = %v, want nil", err)
				}
				return
			}
			if err == nil || err.Error() != tt.wantErr {
				t.Errorf("Err() = %v, want %s", err, tt.wantErr)
			}
			if !errors.Is(err, ErrNoUsableAccessPoint) {
				t.Errorf("Err() does not wrap ErrNoUsableAccessPoint")
			}
		})
	}
}

// equalStrings compares two lists, treating nil and empty as equal.
func equalStrings(a, b []string) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// TestUnknownUserSecret checks that an unknown user name is checked
// against a secret that costs what a real user's check costs.
func TestUnknownUserSecret(t *testing.T) {
	p := identifyPolicy(t)
	creds := p.Listeners[1]
	if got, want := creds.unknownUserSecret(), creds.Users["alice"].secret; got != want {
		t.Errorf("listener with a bcrypt user: unknown users checked against %p, want alice's secret %p", got, want)
	}
	// A decoy that matched must still not let the unknown user in.
	if _, _, err := creds.Identify("carol", "alice-password", true); !errors.Is(err, ErrBadCredentials) {
		t.Errorf("Identify(unknown user, alice's password) error = %v, want ErrBadCredentials", err)
	}

	setEnv(t, map[string]string{"IAPD_BOB": "bob-password"})
	plain, err := Parse("plain.yaml", []byte(`
listeners:
  - listen: "127.0.0.1:0"
    users: [{name: bob, password_env: IAPD_BOB, app: browser}]
apps: {browser: {access_point: host}}
access_points: {host: {interface: default, dns: system}}
`))
	if err != nil {
		t.Fatalf("Parse: %v", err)
	}
	l := plain.Listeners[0]
	if decoy := l.unknownUserSecret(); decoy.isHashed() || len(decoy.plain) != 32 {
		t.Errorf("listener with only env users: decoy is hashed %v with %d plain bytes, want a 32-byte plain value", decoy.isHashed(), len(decoy.plain))
	}
	if _, _, err := l.Identify("carol", "bob-password", true); !errors.Is(err, ErrBadCredentials) {
		t.Errorf("Identify(unknown user) error = %v, want ErrBadCredentials", err)
	}
}

func TestListenerAllowsClient(t *testing.T) {
	open := &Listener{}
	lan := &Listener{AllowClients: []netip.Prefix{netip.MustParsePrefix("192.0.2.0/24"), netip.MustParsePrefix("2001:db8::/32")}}
	tests := []struct {
		name     string
		listener *Listener
		client   string
		want     bool
	}{
		{name: "no ranges allows all", listener: open, client: "203.0.113.9", want: true},
		{name: "inside ipv4", listener: lan, client: "192.0.2.77", want: true},
		{name: "outside ipv4", listener: lan, client: "192.0.3.1", want: false},
		{name: "ipv4 mapped inside", listener: lan, client: "::ffff:192.0.2.77", want: true},
		{name: "inside ipv6 with zone", listener: lan, client: "2001:db8::5%eth0", want: true},
		{name: "outside ipv6", listener: lan, client: "2001:db9::5", want: false},
		{name: "loopback not listed", listener: lan, client: "127.0.0.1", want: false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := tt.listener.AllowsClient(netip.MustParseAddr(tt.client)); got != tt.want {
				t.Errorf("AllowsClient(%s) = %v, want %v", tt.client, got, tt.want)
			}
		})
	}
}

// TestSecretsRedacted checks that no way of printing or logging a password,
// a user or a secret reveals the password or its hash.
func TestSecretsRedacted(t *testing.T) {
	p := identifyPolicy(t)
	alice, bob := p.Listeners[1].Users["alice"], p.Listeners[1].Users["bob"]
	password := Password("alice-password")

	var logged strings.Builder
	logger := slog.New(slog.NewTextHandler(&logged, nil))
	logger.Info("login", "password", password, "user", alice, "bob", *bob, "secret", bob.secret)
	logger.Info("login", slog.Any("password", password), slog.Any("secret", alice.secret))

	outputs := map[string]string{
		"log":            logged.String(),
		"%v password":    fmt.Sprintf("%v", password),
		"%s password":    fmt.Sprintf("%s", password),
		"%q password":    fmt.Sprintf("%q", password),
		"%#v password":   fmt.Sprintf("%#v", password),
		"%x password":    fmt.Sprintf("%x", password),
		"%+v user":       fmt.Sprintf("%+v", alice),
		"%#v user value": fmt.Sprintf("%#v", *bob),
		"%+v user value": fmt.Sprintf("%+v", *bob),
		"%v users map":   fmt.Sprintf("%v", p.Listeners[1].Users),
		"%+v secret":     fmt.Sprintf("%+v", bob.secret),
		"%v listener":    fmt.Sprintf("%+v", *p.Listeners[1]),
		"%v decoy":       fmt.Sprintf("%+v", p.Listeners[1].unknownUserSecret()),
	}
	hash := string(alice.secret.bcrypt)
	for name, out := range outputs {
		for _, leak := range []string{"alice-password", "bob-password", hash, hex.EncodeToString([]byte("bob-password")), hash[7:20]} {
			if strings.Contains(out, leak) {
				t.Errorf("%s reveals %q: %s", name, leak, out)
			}
		}
	}
	if got := fmt.Sprint(password); got != "[redacted]" {
		t.Errorf("fmt.Sprint(password) = %q, want [redacted]", got)
	}
	if !strings.Contains(logged.String(), "user.name=alice user.app=mail") {
		t.Errorf("log lacks the user's name and app: %s", logged.String())
	}
}
