package config

import (
	"os"
	"strings"
)

// DefaultPath is where relay looks for its config without --config and
// $RELAY_CONFIG.
const DefaultPath = "/etc/relay/relay.toml"

// PathFromArgs takes "--config FILE" (or --config=FILE) from the front of a
// subcommand's arguments and returns the config path and the remaining
// arguments. Without the flag it is $RELAY_CONFIG, then DefaultPath;
// explicit is true when the path was given by flag or environment.
func PathFromArgs(args []string) (path string, rest []string, explicit bool) {
	if len(args) >= 2 && (args[0] == "--config" || args[0] == "-config") {
		return args[1], args[2:], true
	}
	if len(args) >= 1 {
		if v, ok := strings.CutPrefix(args[0], "--config="); ok {
			return v, args[1:], true
		}
	}
	if v := os.Getenv("RELAY_CONFIG"); v != "" {
		return v, args, true
	}
	return DefaultPath, args, false
}
