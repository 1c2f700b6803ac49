package nats

import (
	"errors"
	"fmt"
	"strings"
)

// checkName applies the server's rules for stream and consumer names.
func checkName(s string) error {
	if strings.ContainsAny(s, " \t\r\n.*>/\\") {
		return fmt.Errorf("%q must not contain whitespace, '.', '*', '>', '/' or '\\'", s)
	}
	return nil
}

// checkFilter applies NATS's rules for a subscription subject.
func checkFilter(s string) error {
	if s == "" {
		return errors.New("empty subject")
	}
	if strings.ContainsAny(s, " \t\r\n") {
		return fmt.Errorf("subject %q contains whitespace", s)
	}
	toks := strings.Split(s, ".")
	for i, tok := range toks {
		switch {
		case tok == "":
			return fmt.Errorf("subject %q has an empty token", s)
		case tok == ">" && i != len(toks)-1:
			return fmt.Errorf("subject %q has '>' before its last token", s)
		}
	}
	return nil
}

// sampleSubject returns a literal subject that pattern matches.
func sampleSubject(pattern string) string {
	toks := strings.Split(pattern, ".")
	for i, tok := range toks {
		if tok == "*" || tok == ">" {
			toks[i] = "sample"
		}
	}
	return strings.Join(toks, ".")
}

// subjectMatches reports whether the literal subject matches pattern,
// with NATS wildcards.
func subjectMatches(pattern, subject string) bool {
	p := strings.Split(pattern, ".")
	s := strings.Split(subject, ".")
	for i, tok := range p {
		switch {
		case tok == ">":
			return len(s) > i
		case i >= len(s):
			return false
		case tok != "*" && tok != s[i]:
			return false
		}
	}
	return len(p) == len(s)
}

func matchesAny(patterns []string, subject string) bool {
	for _, p := range patterns {
		if subjectMatches(p, subject) {
			return true
		}
	}
	return false
}
