package iface

import (
	"fmt"
	"maps"
	"os"
	"testing"

	"iapd/policy"
)

// helperEnv makes the test binary run a helper instead of the tests, for
// tests that need a process with other privileges.
const helperEnv = "IAPD_IFACE_TEST_HELPER"

// runHelper runs the helper named by helperEnv and returns the exit code.
func runHelper(name string) int {
	switch name {
	case "new-manager":
		// Prints what NewManager returns for a policy with one access
		// point bound to an interface.
		p := testPolicy(
			&policy.AccessPoint{Name: "fallback", Interface: policy.DefaultInterface},
			&policy.AccessPoint{Name: "cell", Interface: "cell"},
		)
		m, err := NewManager(ManagerConfig{Policy: p})
		if err != nil {
			fmt.Println(err)
			return 0
		}
		m.Close()
		fmt.Println("no error")
		return 0
	}
	fmt.Fprintf(os.Stderr, "unknown helper %q\n", name)
	return 2
}

func TestAssignSlots(t *testing.T) {
	tests := []struct {
		name string
		old  map[string]int
		aps  []string
		want map[string]int
	}{
		{name: "first load uses file order", aps: []string{"wifi", "cell", "vpn"}, want: map[string]int{"wifi": 0, "cell": 1, "vpn": 2}},
		{name: "kept names keep offsets", old: map[string]int{"wifi": 0, "cell": 1}, aps: []string{"cell", "wifi"}, want: map[string]int{"cell": 1, "wifi": 0}},
		{name: "new names fill gaps", old: map[string]int{"wifi": 0, "cell": 2}, aps: []string{"vpn", "cell", "lan"}, want: map[string]int{"vpn": 0, "cell": 2, "lan": 1}},
		{name: "new names after the taken ones", old: map[string]int{"wifi": 0, "cell": 1}, aps: []string{"wifi", "cell", "vpn"}, want: map[string]int{"wifi": 0, "cell": 1, "vpn": 2}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var aps []*policy.AccessPoint
			for _, name := range tt.aps {
				aps = append(aps, &policy.AccessPoint{Name: name, Interface: name})
			}
			got := assignSlots(testPolicy(aps...), tt.old)
			if !maps.Equal(got, tt.want) {
				t.Errorf("slots %v, want %v", got, tt.want)
			}
		})
	}
}
