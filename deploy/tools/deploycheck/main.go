// Command deploycheck reads cafe-gateway's deployment files with the parsers of the
// programs that consume them, so that tests/test_deploy.py can check them offline:
//
//	deploycheck dockerfile DOCKERFILE CONTEXT   BuildKit's Dockerfile parser and linter
//	deploycheck compose COMPOSE_FILE            compose-go, the loader of `docker compose`
//	deploycheck rules RULES_FILE...             Prometheus' rule file parser (`promtool check rules`)
//	deploycheck promql < ["expr", ...]          Prometheus' PromQL parser
//
// Each prints one JSON document on stdout for the test to judge, and exits 1 when the
// file does not parse. Policy (which user, which ports) is the test's business, not
// this program's: it only reports what the files say.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"github.com/compose-spec/compose-go/v2/cli"
	"github.com/moby/buildkit/frontend/dockerfile/instructions"
	"github.com/moby/buildkit/frontend/dockerfile/linter"
	"github.com/moby/buildkit/frontend/dockerfile/parser"
	"github.com/moby/buildkit/frontend/dockerfile/shell"
	"github.com/moby/patternmatcher"
	"github.com/moby/patternmatcher/ignorefile"
	"github.com/prometheus/common/model"
	"github.com/prometheus/prometheus/model/rulefmt"
	promparser "github.com/prometheus/prometheus/promql/parser"
)

func main() {
	if len(os.Args) < 2 {
		usage()
	}
	var err error
	switch args := os.Args[2:]; os.Args[1] {
	case "dockerfile":
		if len(args) != 2 {
			usage()
		}
		err = checkDockerfile(args[0], args[1])
	case "compose":
		if len(args) != 1 {
			usage()
		}
		err = checkCompose(args[0])
	case "rules":
		if len(args) == 0 {
			usage()
		}
		err = checkRules(args)
	case "promql":
		err = parsePromQL(os.Stdin)
	case "version":
		fmt.Println("deploycheck 1")
	default:
		usage()
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "deploycheck:", err)
		os.Exit(1)
	}
}

func usage() {
	fmt.Fprintln(os.Stderr, "usage: deploycheck dockerfile FILE CONTEXT | compose FILE | rules FILE... | promql < exprs.json")
	os.Exit(2)
}

func emit(v any) error {
	enc := json.NewEncoder(os.Stdout)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

// --- Dockerfile -------------------------------------------------------------------

type lintWarning struct {
	Rule    string `json:"rule"`
	Message string `json:"message"`
	Line    int    `json:"line"`
}

type copySource struct {
	Stage   string `json:"stage"`
	Path    string `json:"path"`
	Exists  bool   `json:"exists"`
	Ignored bool   `json:"ignored"`
}

type stageReport struct {
	Name      string   `json:"name"`
	Base      string   `json:"base"`
	User      string   `json:"user"`
	Workdir   string   `json:"workdir"`
	Env       []string `json:"env"`
	Expose    []string `json:"expose"`
	Cmd       []string `json:"cmd"`
	CmdJSON   bool     `json:"cmd_json"`
	Entry     []string `json:"entrypoint"`
	EntryJSON bool     `json:"entrypoint_json"`
	Health    []string `json:"healthcheck"`
	Volumes   []string `json:"volumes"`
	Runs      int      `json:"runs"`
}

type dockerfileReport struct {
	Warnings []lintWarning `json:"warnings"`
	Stages   []stageReport `json:"stages"`
	Copies   []copySource  `json:"copy_sources"`
}

// argEnv is what ${NAME} expands to inside one stage: its ARG defaults and ENVs.
type argEnv map[string]string

func (e argEnv) Get(k string) (string, bool) { v, ok := e[k]; return v, ok }
func (e argEnv) Keys() []string {
	keys := make([]string, 0, len(e))
	for k := range e {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}

func checkDockerfile(path, contextDir string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	result, err := parser.Parse(f)
	if err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	report := dockerfileReport{Warnings: []lintWarning{}, Stages: []stageReport{}, Copies: []copySource{}}
	for _, w := range result.Warnings {
		line := 0
		if w.Location != nil {
			line = w.Location.Start.Line
		}
		report.Warnings = append(report.Warnings, lintWarning{Rule: "parser", Message: w.Short, Line: line})
	}
	// Every rule BuildKit runs while parsing, experimental ones included, as
	// `docker build --check` would report them.
	lint := linter.New(&linter.Config{
		ExperimentalAll: true,
		Warn: func(rule, description, url, msg string, location []parser.Range) {
			line := 0
			if len(location) > 0 {
				line = location[0].Start.Line
			}
			report.Warnings = append(report.Warnings, lintWarning{Rule: rule, Message: msg, Line: line})
		},
	})
	stages, metaArgs, err := instructions.Parse(result.AST, lint)
	if err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	ignore, err := readDockerignore(contextDir)
	if err != nil {
		return err
	}
	lex := shell.NewLex(result.EscapeToken)
	for _, stage := range stages {
		env := argEnv{}
		for _, meta := range metaArgs {
			for _, kv := range meta.Args {
				if kv.Value != nil {
					env[kv.Key] = *kv.Value
				}
			}
		}
		expand := func(word string) (string, error) {
			out, _, err := lex.ProcessWord(word, env)
			return out, err
		}
		sr := stageReport{Name: stage.Name, Base: stage.BaseName, Env: []string{}, Expose: []string{}, Volumes: []string{}}
		for _, cmd := range stage.Commands {
			if ex, ok := cmd.(instructions.SupportsSingleWordExpansion); ok {
				if err := ex.Expand(expand); err != nil {
					return fmt.Errorf("%s: %s: %w", path, cmd.Name(), err)
				}
			}
			switch c := cmd.(type) {
			case *instructions.ArgCommand:
				for _, kv := range c.Args {
					if kv.Value != nil {
						env[kv.Key] = *kv.Value
					}
				}
			case *instructions.EnvCommand:
				for _, kv := range c.Env {
					env[kv.Key] = kv.Value
					sr.Env = append(sr.Env, kv.Key+"="+kv.Value)
				}
			case *instructions.UserCommand:
				sr.User = c.User
			case *instructions.WorkdirCommand:
				sr.Workdir = c.Path
			case *instructions.ExposeCommand:
				sr.Expose = append(sr.Expose, c.Ports...)
			case *instructions.CmdCommand:
				sr.Cmd, sr.CmdJSON = c.CmdLine, !c.PrependShell
			case *instructions.EntrypointCommand:
				sr.Entry, sr.EntryJSON = c.CmdLine, !c.PrependShell
			case *instructions.HealthCheckCommand:
				sr.Health = c.Health.Test
			case *instructions.VolumeCommand:
				sr.Volumes = append(sr.Volumes, c.Volumes...)
			case *instructions.RunCommand:
				sr.Runs++
			case *instructions.CopyCommand:
				if c.From != "" {
					continue
				}
				for _, src := range c.SourcePaths {
					report.Copies = append(report.Copies, copySourceOf(stage.Name, src, contextDir, ignore))
				}
			case *instructions.AddCommand:
				for _, src := range c.SourcePaths {
					report.Copies = append(report.Copies, copySourceOf(stage.Name, src, contextDir, ignore))
				}
			}
		}
		report.Stages = append(report.Stages, sr)
	}
	return emit(report)
}

func readDockerignore(contextDir string) (*patternmatcher.PatternMatcher, error) {
	f, err := os.Open(filepath.Join(contextDir, ".dockerignore"))
	if errors.Is(err, os.ErrNotExist) {
		return patternmatcher.New(nil)
	} else if err != nil {
		return nil, err
	}
	defer f.Close()
	patterns, err := ignorefile.ReadAll(f)
	if err != nil {
		return nil, fmt.Errorf(".dockerignore: %w", err)
	}
	return patternmatcher.New(patterns)
}

func copySourceOf(stage, src, contextDir string, ignore *patternmatcher.PatternMatcher) copySource {
	rel := filepath.Clean(strings.TrimPrefix(src, "/"))
	_, err := os.Stat(filepath.Join(contextDir, rel))
	ignored, _ := ignore.MatchesOrParentMatches(filepath.ToSlash(rel))
	return copySource{Stage: stage, Path: src, Exists: err == nil, Ignored: ignored}
}

// --- Compose ----------------------------------------------------------------------

type composeService struct {
	Image        string            `json:"image"`
	BuildContext string            `json:"build_context"`
	Dockerfile   string            `json:"dockerfile"`
	Environment  map[string]string `json:"environment"`
	Ports        []string          `json:"ports"`
	DependsOn    map[string]string `json:"depends_on"`
	Healthcheck  []string          `json:"healthcheck"`
	Binds        []bindMount       `json:"binds"`
	Volumes      []string          `json:"volumes"`
	ReadOnly     bool              `json:"read_only"`
	User         string            `json:"user"`
}

type bindMount struct {
	Source string `json:"source"`
	Target string `json:"target"`
	Exists bool   `json:"exists"`
}

type composeReport struct {
	Name     string                    `json:"name"`
	Services map[string]composeService `json:"services"`
	Volumes  []string                  `json:"volumes"`
	Missing  []string                  `json:"missing_files"`
}

func checkCompose(path string) error {
	ctx := context.Background()
	// What `docker compose -f PATH config` does: interpolate from an empty
	// environment (defaults in the file apply), validate against the Compose
	// specification's schema, normalise, and check that references resolve.
	opts, err := cli.NewProjectOptions(
		[]string{path},
		cli.WithEnv([]string{}),
		cli.WithWorkingDirectory(filepath.Dir(path)),
		cli.WithInterpolation(true),
		cli.WithNormalization(true),
		cli.WithConsistency(true),
		cli.WithResolvedPaths(true),
	)
	if err != nil {
		return err
	}
	project, err := opts.LoadProject(ctx)
	if err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	report := composeReport{Name: project.Name, Services: map[string]composeService{}, Volumes: []string{}, Missing: []string{}}
	for name := range project.Volumes {
		report.Volumes = append(report.Volumes, name)
	}
	sort.Strings(report.Volumes)
	for name, svc := range project.Services {
		cs := composeService{
			Image:       svc.Image,
			Environment: map[string]string{},
			Ports:       []string{},
			DependsOn:   map[string]string{},
			Binds:       []bindMount{},
			Volumes:     []string{},
			ReadOnly:    svc.ReadOnly,
			User:        svc.User,
		}
		if svc.Build != nil {
			cs.BuildContext = svc.Build.Context
			cs.Dockerfile = svc.Build.Dockerfile
			dockerfile := svc.Build.Dockerfile
			if !filepath.IsAbs(dockerfile) {
				dockerfile = filepath.Join(svc.Build.Context, dockerfile)
			}
			for _, p := range []string{svc.Build.Context, dockerfile} {
				if _, err := os.Stat(p); err != nil {
					report.Missing = append(report.Missing, name+": "+p)
				}
			}
		}
		for k, v := range svc.Environment {
			if v != nil {
				cs.Environment[k] = *v
			}
		}
		for _, p := range svc.Ports {
			cs.Ports = append(cs.Ports, fmt.Sprintf("%s:%s:%d/%s", p.HostIP, p.Published, p.Target, p.Protocol))
		}
		for dep, cond := range svc.DependsOn {
			cs.DependsOn[dep] = cond.Condition
		}
		if svc.HealthCheck != nil {
			cs.Healthcheck = svc.HealthCheck.Test
		}
		for _, v := range svc.Volumes {
			switch v.Type {
			case "bind":
				_, err := os.Stat(v.Source)
				cs.Binds = append(cs.Binds, bindMount{Source: v.Source, Target: v.Target, Exists: err == nil})
				if err != nil {
					report.Missing = append(report.Missing, name+": "+v.Source)
				}
			case "volume":
				cs.Volumes = append(cs.Volumes, v.Source+":"+v.Target)
			}
		}
		report.Services[name] = cs
	}
	return emit(report)
}

// --- Prometheus -------------------------------------------------------------------

type ruleReport struct {
	File   string   `json:"file"`
	Groups int      `json:"groups"`
	Rules  int      `json:"rules"`
	Errors []string `json:"errors"`
}

func checkRules(files []string) error {
	logger := slog.New(slog.NewTextHandler(os.Stderr, nil))
	p := promparser.NewParser(promparser.Options{})
	reports := []ruleReport{}
	failed := false
	for _, file := range files {
		// As `promtool check rules` does: unknown fields are errors, expressions
		// must parse, templates in labels and annotations must compile.
		groups, errs := rulefmt.ParseFile(file, false, model.LegacyValidation, p, logger)
		r := ruleReport{File: file, Errors: []string{}}
		for _, e := range errs {
			r.Errors = append(r.Errors, e.Error())
		}
		if groups != nil {
			r.Groups = len(groups.Groups)
			for _, g := range groups.Groups {
				r.Rules += len(g.Rules)
			}
		}
		failed = failed || len(errs) > 0
		reports = append(reports, r)
	}
	if err := emit(reports); err != nil {
		return err
	}
	if failed {
		return errors.New("rule files have errors")
	}
	return nil
}

type exprReport struct {
	Expr    string   `json:"expr"`
	Metrics []string `json:"metrics"`
	Error   string   `json:"error,omitempty"`
}

// parsePromQL reads a JSON list of expressions and reports, for each, the metric
// names its selectors use, or why it does not parse.
func parsePromQL(in io.Reader) error {
	var exprs []string
	if err := json.NewDecoder(in).Decode(&exprs); err != nil {
		return fmt.Errorf("stdin: want a JSON list of strings: %w", err)
	}
	p := promparser.NewParser(promparser.Options{})
	reports := make([]exprReport, 0, len(exprs))
	for _, text := range exprs {
		r := exprReport{Expr: text, Metrics: []string{}}
		expr, err := p.ParseExpr(text)
		if err != nil {
			r.Error = err.Error()
		} else {
			names := map[string]bool{}
			promparser.Inspect(expr, func(node promparser.Node, _ []promparser.Node) error {
				if vs, ok := node.(*promparser.VectorSelector); ok {
					name := vs.Name
					if name == "" {
						// {__name__="..."} instead of a bare name.
						for _, m := range vs.LabelMatchers {
							if m.Name == model.MetricNameLabel {
								name = m.Value
							}
						}
					}
					names[name] = true
				}
				return nil
			})
			for n := range names {
				r.Metrics = append(r.Metrics, n)
			}
			sort.Strings(r.Metrics)
		}
		reports = append(reports, r)
	}
	return emit(reports)
}
