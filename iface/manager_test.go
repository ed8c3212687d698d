package iface

import (
	"fmt"
	"os"

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
