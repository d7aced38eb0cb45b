package doctor

import (
	"errors"
	"fmt"
	"io/fs"
	"strings"

	"relay/config"
)

// checkConfig loads the config as check-config does. The other checks
// then use it; when only files it names could not be read (not root),
// they go on with what the TOML says.
func (r *run) checkConfig() {
	path := r.o.Config
	const check = "config"
	cfg, err := config.Load(path)
	if err == nil {
		r.cfg = cfg
		if len(cfg.Warnings) == 0 {
			r.ok(check, "%s loads (as relay check-config)", path)
			return
		}
		r.add(check, Warn, "change the setting each warning names (relay check-config --config "+path+" lists them)",
			"%s loads with %d warning(s): %s", path, len(cfg.Warnings), joinErrors(cfg.Warnings, 3))
		return
	}
	if _, serr := statPath(path); errors.Is(serr, fs.ErrNotExist) {
		r.add(check, Fail, "write "+path+" (start from relay.example.toml; README, Installing), or run relay doctor --config FILE",
			"%s does not exist", path)
		return
	}
	plain, plainErr := config.LoadFile(path)
	if plainErr == nil {
		r.cfg = plain // the other checks go on with the TOML alone
	}
	var es config.Errors
	errors.As(err, &es)
	if plainErr == nil && !r.root() && len(es) > 0 && allPermission(es) {
		r.notChecked(check, fmt.Sprintf("%s decodes, but files it names cannot be read: %s", path, joinErrors(es, 3)))
		return
	}
	r.add(check, Fail, "run relay check-config --config "+path+" and correct each line it names",
		"%s does not load: %s", path, joinErrors(es, 5))
}

// allPermission reports whether every error is a file this user may not
// read.
func allPermission(es config.Errors) bool {
	for _, e := range es {
		if !strings.Contains(e.Msg, "permission denied") {
			return false
		}
	}
	return true
}

// joinErrors gives the first n errors on one line.
func joinErrors(es config.Errors, n int) string {
	var parts []string
	for i, e := range es {
		if i == n {
			parts = append(parts, fmt.Sprintf("and %d more", len(es)-n))
			break
		}
		parts = append(parts, e.Error())
	}
	return strings.Join(parts, "; ")
}
