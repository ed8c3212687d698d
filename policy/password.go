package policy

import (
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"fmt"
	"io"
	"log/slog"
	"runtime"
	"strconv"
	"strings"
	"sync/atomic"

	"golang.org/x/crypto/argon2"
	"golang.org/x/crypto/bcrypt"
)

// redacted is what a password, a hash or a secret prints and logs as.
const redacted = "[redacted]"

// Password is a password as a client sent it. It prints and logs as
// "[redacted]", so that a stray log attribute or format verb cannot reveal
// it; convert it to a string to read the value.
type Password string

func (Password) String() string   { return redacted }
func (Password) GoString() string { return redacted }

// LogValue implements slog.LogValuer.
func (Password) LogValue() slog.Value { return slog.StringValue(redacted) }

// Format implements fmt.Formatter for every verb.
func (Password) Format(f fmt.State, _ rune) { io.WriteString(f, redacted) }

// secret is a user's password as the policy gives it: a bcrypt or argon2id
// hash, or the plain value of an environment variable read at load time.
// It prints and logs as "[redacted]".
type secret struct {
	bcrypt []byte      // bcrypt hash; nil unless the policy gave one
	argon2 *argon2Hash // argon2id hash; nil unless the policy gave one
	plain  []byte      // password from the environment; nil when hashed

	// verified is the SHA-256 of the last password that matched the
	// hash, so that a client that logs in often pays for the slow hash
	// once. It holds a digest, not the password.
	verified atomic.Pointer[[sha256.Size]byte]
}

func (*secret) String() string             { return redacted }
func (*secret) GoString() string           { return redacted }
func (*secret) LogValue() slog.Value       { return slog.StringValue(redacted) }
func (*secret) Format(f fmt.State, _ rune) { io.WriteString(f, redacted) }

// isHashed reports whether s is checked with a slow hash.
func (s *secret) isHashed() bool { return s.bcrypt != nil || s.argon2 != nil }

// slowChecks bounds the bcrypt and argon2id computations that run at once.
// Each costs tens of milliseconds of CPU, and argon2id also its memory
// parameter, so a burst of logins must queue instead of taking the
// daemon's memory or every core.
var slowChecks = make(chan struct{}, max(runtime.GOMAXPROCS(0), 1))

// newPlainDecoy returns the secret that Identify checks for an unknown user
// name on a listener whose users all have plain passwords: a random value
// that no password matches, compared the same way.
func newPlainDecoy() *secret {
	value := make([]byte, 32)
	rand.Read(value)
	return &secret{plain: value}
}

// unknownUserSecret returns the secret that Identify checks for an unknown
// user name. It costs as much time as a check of l's own users, so that the
// reply time does not tell unknown names from wrong passwords.
func (l *Listener) unknownUserSecret() *secret {
	if l.unknownUser != nil {
		return l.unknownUser
	}
	return newPlainDecoy()
}

// CheckPassword reports whether password is u's password, comparing in
// constant time.
func (u *User) CheckPassword(password Password) bool {
	return u.secret.check(password, true)
}

// check reports whether password matches s. With useCache, a repeat of
// the last password that matched skips the slow hash.
func (s *secret) check(password Password, useCache bool) bool {
	p := []byte(password)
	digest := sha256.Sum256(p)
	if !s.isHashed() {
		// Comparing digests keeps the time independent of the lengths.
		want := sha256.Sum256(s.plain)
		return subtle.ConstantTimeCompare(digest[:], want[:]) == 1
	}

	if last := s.verified.Load(); useCache && last != nil && subtle.ConstantTimeCompare(digest[:], last[:]) == 1 {
		return true
	}

	slowChecks <- struct{}{}
	var ok bool
	if s.bcrypt != nil {
		ok = bcrypt.CompareHashAndPassword(s.bcrypt, p) == nil
	} else {
		ok = s.argon2.matches(p)
	}
	<-slowChecks

	if ok && useCache {
		s.verified.Store(&digest)
	}
	return ok
}

// argon2Hash is an argon2id hash with its parameters (RFC 9106).
type argon2Hash struct {
	memory  uint32 // KiB
	time    uint32 // passes
	threads uint8  // lanes
	salt    []byte
	key     []byte
}

func (h *argon2Hash) matches(password []byte) bool {
	key := argon2.IDKey(password, h.salt, h.time, h.memory, h.threads, uint32(len(h.key)))
	return subtle.ConstantTimeCompare(key, h.key) == 1
}

// Bounds on argon2id parameters. maxArgon2Memory keeps a mistyped memory
// cost from taking gigabytes at every login.
const (
	argon2Version    = 19 // 0x13, the version RFC 9106 specifies
	maxArgon2Memory  = 1 << 20
	minArgon2Salt    = 8 // bytes, RFC 9106 section 3.1
	minArgon2Key     = 4 // bytes, RFC 9106 section 3.1
	argon2HashFormat = "$argon2id$v=19$m=KiB,t=passes,p=lanes$salt$hash"
)

// parseArgon2id parses an argon2id hash in the PHC string format, as the
// reference argon2 command prints it with -e:
// $argon2id$v=19$m=65536,t=3,p=4$<salt>$<hash>, with salt and hash in
// base64 without padding. It returns why s is not one, or "".
func parseArgon2id(s string) (*argon2Hash, string) {
	parts := strings.Split(s, "$")
	if len(parts) != 6 || parts[0] != "" || parts[1] != "argon2id" {
		return nil, "want " + argon2HashFormat
	}
	if parts[2] != "v="+strconv.Itoa(argon2Version) {
		return nil, fmt.Sprintf("version %q, want v=%d", parts[2], argon2Version)
	}

	h := &argon2Hash{}
	params := strings.Split(parts[3], ",")
	if len(params) != 3 {
		return nil, fmt.Sprintf("parameters %q, want m=KiB,t=passes,p=lanes", parts[3])
	}
	for i, name := range []string{"m", "t", "p"} {
		text, ok := strings.CutPrefix(params[i], name+"=")
		if !ok {
			return nil, fmt.Sprintf("parameters %q, want m=KiB,t=passes,p=lanes", parts[3])
		}
		v, err := strconv.ParseUint(text, 10, 32)
		if err != nil || v == 0 {
			return nil, fmt.Sprintf("parameter %s must be a number above zero", params[i])
		}
		switch name {
		case "m":
			h.memory = uint32(v)
		case "t":
			h.time = uint32(v)
		case "p":
			if v > 255 {
				return nil, fmt.Sprintf("parameter %s out of range 1 to 255", params[i])
			}
			h.threads = uint8(v)
		}
	}
	switch {
	case h.memory < 8*uint32(h.threads):
		return nil, fmt.Sprintf("memory m=%d is below 8 KiB per lane (p=%d)", h.memory, h.threads)
	case h.memory > maxArgon2Memory:
		return nil, fmt.Sprintf("memory m=%d is above %d KiB (1 GiB), which every login would use", h.memory, maxArgon2Memory)
	}

	var err error
	if h.salt, err = base64.RawStdEncoding.DecodeString(parts[4]); err != nil {
		return nil, "salt is not base64 without padding"
	}
	if h.key, err = base64.RawStdEncoding.DecodeString(parts[5]); err != nil {
		return nil, "hash is not base64 without padding"
	}
	switch {
	case len(h.salt) < minArgon2Salt:
		return nil, fmt.Sprintf("salt of %d bytes, want at least %d", len(h.salt), minArgon2Salt)
	case len(h.key) < minArgon2Key:
		return nil, fmt.Sprintf("hash of %d bytes, want at least %d", len(h.key), minArgon2Key)
	}
	return h, ""
}
