package main

import (
	"fmt"
	"io"
	"os"
	"strings"
	"unicode/utf8"

	"github.com/spf13/pflag"

	hide "github.com/exactlyonce/exactly/internal/redact"
)

// maxConfigSize bounds a --config file: a relay's settings fit in a few
// hundred bytes, and a file read whole must not exhaust memory.
const maxConfigSize = 1 << 20

// maxShown is the most runes of a value quoted back in a message.
const maxShown = 80

// cut shortens s for a message: at most maxShown runes, then how much was
// left out.
func cut(s string) string {
	if utf8.RuneCountInString(s) <= maxShown {
		return s
	}
	r := []rune(s)
	return fmt.Sprintf("%s… (%d bytes in all)", string(r[:maxShown]), len(s))
}

// shownValue is how a flag's value appears in an error: hidden for a
// secret flag, else redacted and cut.
func shownValue(name, value string) string {
	if secretFlags[name] {
		return hide.Mask
	}
	return fmt.Sprintf("%q", cut(hide.String(value)))
}

// registerValue hides, from then on, the secrets a flag's value holds.
func registerValue(name, value string) {
	if secretFlags[name] {
		hide.Add(value)
		return
	}
	hide.AddFrom(value)
}

// want says what a flag of this type takes, for an error about a value it
// refused (pflag's own error quotes the value whole).
func want(f *pflag.Flag) string {
	switch f.Value.Type() {
	case "int", "int64", "uint", "uint64":
		return "want a whole number"
	case "duration":
		return "want a duration such as 500ms, 30s or 5m"
	case "bool":
		return "want true or false"
	}
	return "not accepted"
}

// applyEnv sets every flag not given on the command line from its
// environment variable in envs, if that is set.
func applyEnv(fl *pflag.FlagSet, envs map[string]string) error {
	var err error
	fl.VisitAll(func(f *pflag.Flag) {
		env, ok := envs[f.Name]
		if !ok || f.Changed || err != nil {
			return
		}
		v, set := os.LookupEnv(env)
		if !set || v == "" {
			return
		}
		registerValue(f.Name, v)
		if e := fl.Set(f.Name, v); e != nil {
			err = fmt.Errorf("invalid value %s in %s (for --%s): %s", shownValue(f.Name, v), env, f.Name, want(f))
		}
	})
	return err
}

// envName is the environment variable of a flag: EXACTLY_ and its name in
// capitals, dashes made underscores.
func envName(flag string) string {
	return "EXACTLY_" + strings.ToUpper(strings.ReplaceAll(flag, "-", "_"))
}

// configEntry is one "name = value" line of a config file.
type configEntry struct {
	line        int
	name, value string
}

// readConfigFile reads and parses a config file of "name = value" lines,
// at most maxConfigSize bytes. A name given twice is an error naming both
// lines.
func readConfigFile(path string) ([]configEntry, error) {
	fh, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("--config: %w", err)
	}
	defer fh.Close()
	b, err := io.ReadAll(io.LimitReader(fh, maxConfigSize+1))
	if err != nil {
		return nil, fmt.Errorf("--config %s: %w", path, err)
	}
	if len(b) > maxConfigSize {
		return nil, fmt.Errorf("--config %s: larger than the limit of 1 MiB; a config file holds a few name = value lines", path)
	}
	if !utf8.Valid(b) {
		return nil, fmt.Errorf("--config %s: not UTF-8 text", path)
	}
	var out []configEntry
	seen := map[string]int{}
	for i, line := range strings.Split(string(b), "\n") {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		name, value, ok := strings.Cut(line, "=")
		if !ok {
			return nil, fmt.Errorf("--config %s line %d: want name = value", path, i+1)
		}
		name, value = strings.TrimSpace(name), strings.Trim(strings.TrimSpace(value), `"`)
		if prev, dup := seen[name]; dup {
			return nil, fmt.Errorf("--config %s: %q is set twice, on line %d and line %d; keep one", path, cut(name), prev, i+1)
		}
		seen[name] = i + 1
		out = append(out, configEntry{line: i + 1, name: name, value: value})
	}
	return out, nil
}

// applyConfigFile sets, from a file of "name = value" lines, every flag
// that neither the command line nor the environment set. Unknown names, and
// values a flag refuses, are errors naming the file and the line. It
// returns the line of each setting it applied.
func applyConfigFile(fl *pflag.FlagSet, path string) (map[string]int, error) {
	entries, err := readConfigFile(path)
	if err != nil {
		return nil, err
	}
	applied := map[string]int{}
	for _, e := range entries {
		f := fl.Lookup(e.name)
		if f == nil || e.name == "config" {
			return nil, fmt.Errorf("--config %s line %d: unknown setting %q", path, e.line, cut(hide.String(e.name)))
		}
		registerValue(e.name, e.value)
		if f.Changed {
			continue
		}
		if err := fl.Set(e.name, e.value); err != nil {
			return nil, fmt.Errorf("--config %s line %d: invalid value %s for %s: %s", path, e.line, shownValue(e.name, e.value), e.name, want(f))
		}
		applied[e.name] = e.line
	}
	return applied, nil
}
