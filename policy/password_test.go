package policy

import (
	"testing"

	"golang.org/x/crypto/bcrypt"
)

// TestPasswordCheckCache checks that a repeated correct password skips
// bcrypt, which costs tens of milliseconds per check by design, and that
// a wrong password neither matches nor replaces the cached one.
func TestPasswordCheckCache(t *testing.T) {
	hash, err := bcrypt.GenerateFromPassword([]byte("right"), bcrypt.MinCost)
	if err != nil {
		t.Fatalf("hashing: %v", err)
	}
	s := &secret{bcrypt: hash}

	if !s.check("right", true) {
		t.Fatal("first check of the right password failed")
	}
	if s.check("wrong", true) {
		t.Error("wrong password matched")
	}

	// Without the cache, a hash that matches nothing would fail the next
	// check, so a pass shows that bcrypt did not run.
	s.bcrypt = []byte("$2a$04$invalidinvalidinvalidinvalidinvalidinvalidinvalidinva")
	if !s.check("right", true) {
		t.Error("repeated right password ran bcrypt instead of matching the cached password")
	}
	if s.check("right", false) {
		t.Error("check without the cache matched against an invalid hash")
	}
	if s.check("wrong", true) {
		t.Error("wrong password matched after the cache was filled")
	}
	if s.check("righ", true) {
		t.Error("prefix of the cached password matched")
	}
}
