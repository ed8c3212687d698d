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
