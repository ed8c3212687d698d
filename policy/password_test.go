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
	s := &secret{hash: hash}

	if !s.check("right") {
		t.Fatal("first check of the right password failed")
	}
	if s.check("wrong") {
		t.Error("wrong password matched")
	}

	// Without the cache, a hash that matches nothing would fail the next
	// check, so a pass shows that bcrypt did not run.
	s.hash = []byte("$2a$04$invalidinvalidinvalidinvalidinvalidinvalidinvalidinva")
	if !s.check("right") {
		t.Error("repeated right password ran bcrypt instead of matching the cached password")
	}
	if s.check("wrong") {
		t.Error("wrong password matched after the cache was filled")
	}
	if s.check("righ") {
		t.Error("prefix of the cached password matched")
	}
}
