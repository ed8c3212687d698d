package policy

import (
	"crypto/subtle"
	"sync"

	"golang.org/x/crypto/bcrypt"
)

// secret is a user's password as the policy gives it: a bcrypt hash, or
// the plain value of an environment variable read at load time.
type secret struct {
	hash  []byte // bcrypt hash; nil when plain is used
	plain []byte

	mu       sync.Mutex
	verified []byte // last password that matched hash, to skip bcrypt on repeats
}

// dummySecret is checked for unknown user names, so that they cost as much
// time as a wrong password.
var dummySecret = &secret{hash: []byte("$2a$10$7EqJtq98hPqEX7fNZaFWoOHiA4fJ9jPS8kPpY/0JrQcqeZ7XqxWnu")}

// plainDummySecret replaces dummySecret for unknown user names on a listener whose
// users all have plain passwords from the environment. There a wrong
// password costs no bcrypt run, so dummySecret would make unknown user
// names the slow case and give them away by the reply time.
var plainDummySecret = &secret{plain: []byte("iapd-no-such-user")}

// unknownUserSecret returns the secret that Identify checks for an unknown
// user name, which costs as much time as l's users' own checks.
func (l *Listener) unknownUserSecret() *secret {
	if l.unknownUser != nil {
		return l.unknownUser
	}
	return dummySecret
}

// CheckPassword reports whether password is u's password, comparing in
// constant time.
func (u *User) CheckPassword(password string) bool {
	return u.secret.check(password)
}

func (s *secret) check(password string) bool {
	p := []byte(password)
	if s.hash == nil {
		return subtle.ConstantTimeCompare(p, s.plain) == 1
	}

	// bcrypt costs tens of milliseconds by design; a client that connects
	// often with the same password pays it once.
	s.mu.Lock()
	last := s.verified
	s.mu.Unlock()
	if last != nil && subtle.ConstantTimeCompare(p, last) == 1 {
		return true
	}

	if bcrypt.CompareHashAndPassword(s.hash, p) != nil {
		return false
	}
	s.mu.Lock()
	s.verified = p
	s.mu.Unlock()
	return true
}
