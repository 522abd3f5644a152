//! PEFT's module-selection rules (`tuners_utils.check_target_module_exists`,
//! `utils.other.get_pattern_key`, `_set_trainable`), written once for every method.
//!
//! Python's `re` and Rust's `regex` agree on the syntax configs use in practice; a pattern Rust
//! cannot compile (look-around, back-references) is rejected with the field that holds it.

use regex::Regex;

use crate::config::{ModuleSelector, OneOrMany};
use crate::error::{PeftError, Result};

fn compile(field: &str, pattern: &str) -> Result<Regex> {
    Regex::new(pattern).map_err(|e| PeftError::config(field, format!("regex {pattern:?}: {e}")))
}

// The regexes PEFT builds from config values, each written once.
fn full_match_regex(field: &str, pattern: &str) -> Result<Regex> {
    compile(field, &format!("^(?:{pattern})$"))
}

fn modules_to_save_guard(m: &str) -> Result<Regex> {
    compile("modules_to_save", &format!(r"^(?:|.*\.)(?:{m})(?:$|\..*)$"))
}

fn layer_index_regex(layers_pattern: &str) -> Result<Regex> {
    compile(
        "layers_pattern",
        &format!(r"^.*?\.(?:{layers_pattern})\.(\d+)\."),
    )
}

fn pattern_key_regex(field: &str, pattern: &str) -> Result<Regex> {
    compile(field, &format!(r"^(?:.*\.)?(?:{pattern})$"))
}

pub(crate) fn full_match(field: &str, pattern: &str, key: &str) -> Result<bool> {
    Ok(full_match_regex(field, pattern)?.is_match(key))
}

/// `key` equals an entry or ends with `"." + entry`.
fn dotted_suffix_match<'a>(names: &'a [String], key: &str) -> Option<&'a str> {
    names
        .iter()
        .find(|t| key == t.as_str() || key.ends_with(&format!(".{t}")))
        .map(String::as_str)
}

/// The module-selection part of a config.
#[derive(Debug, Clone, Copy)]
pub struct Selection<'a> {
    pub target_modules: Option<&'a ModuleSelector>,
    pub exclude_modules: Option<&'a ModuleSelector>,
    pub modules_to_save: Option<&'a [String]>,
    pub layers_to_transform: Option<&'a OneOrMany<i64>>,
    pub layers_pattern: Option<&'a OneOrMany<String>>,
}

impl Selection<'_> {
    /// Compiles every pattern once, so a config with a pattern Rust cannot run is rejected when
    /// it is built rather than when it is first used.
    fn check_patterns(&self) -> Result<()> {
        for (field, selector) in [
            ("target_modules", self.target_modules),
            ("exclude_modules", self.exclude_modules),
        ] {
            if let Some(ModuleSelector::Regex(p)) = selector {
                full_match_regex(field, p)?;
            }
        }
        for m in self.modules_to_save.unwrap_or_default() {
            modules_to_save_guard(m)?;
        }
        for p in self
            .layers_pattern
            .map(OneOrMany::to_vec)
            .unwrap_or_default()
        {
            layer_index_regex(&p)?;
        }
        Ok(())
    }

    /// PEFT's checks of the targeting fields (its messages), written once for every method:
    /// a regex `target_modules` takes no layer filter, `layers_pattern` needs
    /// `layers_to_transform`, and every pattern must compile. `"all-linear"` is valid: it is
    /// expanded against a model's modules ([`expand_all_linear`]).
    pub fn validate(&self) -> Result<()> {
        if let Some(ModuleSelector::Regex(_)) = self.target_modules {
            if self.layers_to_transform.is_some() {
                return Err(PeftError::config(
                    "layers_to_transform",
                    "`layers_to_transform` cannot be used when `target_modules` is a str.",
                ));
            }
            if self.layers_pattern.is_some() {
                return Err(PeftError::config(
                    "layers_pattern",
                    "`layers_pattern` cannot be used when `target_modules` is a str.",
                ));
            }
        }
        // PEFT tests the pattern's truthiness: an empty one needs no layers.
        let pattern_given = match self.layers_pattern {
            Some(OneOrMany::One(p)) => !p.is_empty(),
            Some(OneOrMany::Many(p)) => !p.is_empty(),
            None => false,
        };
        if pattern_given && self.layers_to_transform.is_none() {
            return Err(PeftError::config(
                "layers_pattern",
                "When `layers_pattern` is specified, `layers_to_transform` must also be specified.",
            ));
        }
        self.check_patterns()
    }

    /// Whether `target_modules` is PEFT's `"all-linear"` shorthand (any case).
    pub fn is_all_linear(&self) -> bool {
        matches!(self.target_modules, Some(ModuleSelector::Regex(t)) if t.eq_ignore_ascii_case(ALL_LINEAR))
    }

    /// Whether the module at `key` (path relative to the model) gets an adapter layer.
    pub fn is_target(&self, key: &str) -> Result<bool> {
        if self.is_all_linear() {
            return Err(PeftError::InvalidOperation(
                "target_modules=\"all-linear\" must be expanded against the model's modules first"
                    .into(),
            ));
        }
        if let Some(exclude) = self.exclude_modules {
            let excluded = match exclude {
                ModuleSelector::Regex(p) => full_match("exclude_modules", p, key)?,
                ModuleSelector::Names(names) => dotted_suffix_match(names, key).is_some(),
            };
            if excluded {
                return Ok(false);
            }
        }
        for m in self.modules_to_save.unwrap_or_default() {
            // PEFT uses the entry as a raw regex here.
            if modules_to_save_guard(m)?.is_match(key) {
                return Ok(false);
            }
        }
        match self.target_modules {
            None => Ok(false),
            Some(ModuleSelector::Regex(p)) => full_match("target_modules", p, key),
            Some(ModuleSelector::Names(names)) => {
                if names.iter().any(|t| t == key) {
                    // An exact name skips the layer filter, as in PEFT.
                    return Ok(true);
                }
                if dotted_suffix_match(names, key).is_none() {
                    return Ok(false);
                }
                self.layer_selected(key)
            }
        }
    }

    fn layer_selected(&self, key: &str) -> Result<bool> {
        let Some(layers) = self.layers_to_transform else {
            return Ok(true);
        };
        let layers = layers.to_vec();
        if layers.is_empty() {
            return Ok(true);
        }
        let patterns = self
            .layers_pattern
            .map(OneOrMany::to_vec)
            .unwrap_or_default();
        let found = if patterns.iter().all(|p| p.is_empty()) {
            layer_index(&compile("layers_pattern", r"^.*?\.[^.]*\.(\d+)\.")?, key)
        } else {
            let mut found = None;
            for p in patterns.iter().filter(|p| !p.is_empty()) {
                if let Some(i) = layer_index(&layer_index_regex(p)?, key) {
                    found = Some(i);
                    break;
                }
            }
            found
        };
        Ok(found.is_some_and(|i| layers.contains(&i)))
    }
}

fn layer_index(re: &Regex, key: &str) -> Option<i64> {
    // The regex needs the text after the index too ("\."), as Python's `re.match` does.
    re.captures(key)?.get(1)?.as_str().parse().ok()
}

/// Compiles the keys of a `rank_pattern` / `alpha_pattern`.
pub fn check_pattern_keys<T>(field: &str, patterns: &[(String, T)]) -> Result<()> {
    for (pattern, _) in patterns {
        pattern_key_regex(field, pattern)?;
    }
    Ok(())
}

/// `rank_pattern` / `alpha_pattern` lookup: the first key `k` (in order) with
/// `re.match(rf"(.*\.)?({k})$", key)` gives the value.
pub fn pattern_value<T: Copy>(
    field: &str,
    patterns: &[(String, T)],
    key: &str,
) -> Result<Option<T>> {
    for (pattern, value) in patterns {
        if pattern_key_regex(field, pattern)?.is_match(key) {
            return Ok(Some(*value));
        }
    }
    Ok(None)
}

/// PEFT's shorthand for every Linear / transformers Conv1D layer but the output head.
pub const ALL_LINEAR: &str = "all-linear";

/// Head names PEFT leaves out of `"all-linear"` for sequence classification (top-level modules).
const SEQ_CLS_HEAD_NAMES: &[&str] = &["score", "classifier"];

/// PEFT's `_maybe_include_all_linear_layers`: the module paths `"all-linear"` means in a model
/// whose modules are `modules` (path and kind, in the model's order): every Linear and
/// transformers Conv1D, except the output embedding layer (`output_head`, e.g. `lm_head`) or,
/// for a `SEQ_CLS` task without one, the top-level `score` / `classifier` head.
pub fn all_linear_targets(
    modules: &[(String, crate::base::ModuleKind)],
    output_head: Option<&str>,
    task_type: Option<&str>,
) -> Vec<String> {
    use crate::base::ModuleKind;
    let excluded: Option<&str> = match output_head {
        Some(head) => Some(head),
        None if task_type == Some("SEQ_CLS") => SEQ_CLS_HEAD_NAMES
            .iter()
            .copied()
            .find(|n| modules.iter().any(|(p, _)| p == n)),
        None => None,
    };
    modules
        .iter()
        .filter(|(p, kind)| {
            matches!(kind, ModuleKind::Linear | ModuleKind::Conv1D) && Some(p.as_str()) != excluded
        })
        .map(|(p, _)| p.clone())
        .collect()
}

/// PEFT condenses a `target_modules` list of at least this many entries (not for IA³).
pub const MIN_TARGETS_TO_CONDENSE: usize = 20;

/// PEFT's `_find_minimal_target_modules`: the shortest dot-suffixes that select exactly `targets`
/// and none of `others` (shortest first, targets in order of their suffix lists); `targets`
/// itself when no suffix set is found.
pub fn minimal_target_modules(targets: &[String], others: &[String]) -> Vec<String> {
    fn suffixes(s: &str) -> Vec<String> {
        let parts: Vec<&str> = s.split('.').collect();
        (0..parts.len())
            .rev()
            .map(|i| parts[i..].join("."))
            .collect()
    }
    let other_suffixes: std::collections::HashSet<String> =
        others.iter().flat_map(|o| suffixes(o)).collect();
    let mut items: Vec<(String, Vec<String>)> =
        targets.iter().map(|t| (t.clone(), suffixes(t))).collect();
    items.sort_by(|a, b| a.1.cmp(&b.1));
    items.dedup();
    let mut required: Vec<String> = Vec::new();
    for (item, candidates) in &items {
        for suffix in candidates {
            if required.contains(suffix) || other_suffixes.contains(suffix) {
                continue;
            }
            if !required.iter().any(|r| item.ends_with(&format!(".{r}"))) {
                required.push(suffix.clone());
                break;
            }
        }
    }
    if required.is_empty() {
        return targets.to_vec();
    }
    required.sort();
    required
}

/// Whether `key` is wrapped by `modules_to_save` (plain string suffix, no dot boundary, as PEFT).
pub fn is_module_to_save(modules_to_save: &[String], key: &str) -> bool {
    modules_to_save.iter().any(|m| key.ends_with(m.as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> ModuleSelector {
        ModuleSelector::Names(v.iter().map(|s| s.to_string()).collect())
    }

    type Case<'a> = (
        &'a str,
        ModuleSelector,
        Option<Vec<i64>>,
        Option<Vec<&'a str>>,
        bool,
    );

    /// A selection of rows of PEFT's `REGEX_TEST_CASES` (tests/test_tuners_utils.py).
    #[test]
    fn peft_regex_cases() {
        let cases: &[Case] = &[
            ("", names(&[]), None, None, false),
            ("foo", names(&["foo"]), None, None, true),
            (
                "foo",
                ModuleSelector::Regex(".*oo".into()),
                None,
                None,
                true,
            ),
            (
                "foo",
                ModuleSelector::Regex(".*bar.*".into()),
                None,
                None,
                false,
            ),
            (
                "foobar",
                ModuleSelector::Regex(".*oba.*".into()),
                None,
                None,
                true,
            ),
            (
                "foo.bar.1.baz",
                names(&["baz"]),
                Some(vec![1]),
                Some(vec!["bar"]),
                true,
            ),
            (
                "foo.bar.1.baz",
                names(&["baz"]),
                Some(vec![0]),
                Some(vec!["bar"]),
                false,
            ),
            (
                "foo.bar.10.baz",
                names(&["baz"]),
                Some(vec![1]),
                Some(vec!["bar"]),
                false,
            ),
            (
                "foo.whatever.1.baz",
                names(&["baz"]),
                Some(vec![1]),
                Some(vec![]),
                true,
            ),
            (
                "foo.whatever.1.baz",
                names(&["baz"]),
                Some(vec![0]),
                None,
                false,
            ),
            (
                "transformer.h.1.attn.attention.q_proj.foo",
                names(&["q_proj"]),
                None,
                Some(vec![]),
                false,
            ),
            (
                "transformer.h.1.attn.attention.q_proj",
                names(&["q_proj"]),
                Some(vec![0, 1, 2]),
                Some(vec!["h"]),
                true,
            ),
            (
                "transformer.h.1.attn.attention.resid_dropout",
                names(&["q_proj", "v_proj"]),
                None,
                None,
                false,
            ),
            (
                "foo.bar.1.baz",
                names(&["baz"]),
                Some(vec![1]),
                Some(vec!["foo"]),
                false,
            ),
            (
                "bar.1.baz",
                names(&["baz"]),
                Some(vec![1]),
                Some(vec!["bar"]),
                false,
            ),
            (
                "foo.bar.001.baz",
                names(&["baz"]),
                Some(vec![1]),
                Some(vec!["bar"]),
                true,
            ),
            (
                "foo.bar.2.spam.1.baz",
                names(&["baz"]),
                Some(vec![1]),
                Some(vec!["bar"]),
                false,
            ),
            (
                "blocks.1.weight",
                names(&["weight"]),
                Some(vec![1]),
                Some(vec!["blocks"]),
                false,
            ),
            (
                "mlp.blocks.1.weight",
                names(&["weight"]),
                Some(vec![1]),
                Some(vec!["blocks"]),
                true,
            ),
        ];
        for (key, targets, layers, pattern, expected) in cases {
            let layers = layers.clone().map(OneOrMany::Many);
            let pattern = pattern
                .clone()
                .map(|p| OneOrMany::Many(p.iter().map(|s| s.to_string()).collect()));
            let sel = Selection {
                target_modules: Some(targets),
                exclude_modules: None,
                modules_to_save: None,
                layers_to_transform: layers.as_ref(),
                layers_pattern: pattern.as_ref(),
            };
            assert_eq!(sel.is_target(key).unwrap(), *expected, "{key} {targets:?}");
        }
    }

    #[test]
    fn long_target_lists_condense_as_peft_documents() {
        // PEFT's `_find_minimal_target_modules` docstring example.
        let mut targets: Vec<String> = (0..100)
            .map(|i| format!("model.decoder.layers.{i}.self_attn.q_proj"))
            .collect();
        targets.extend((0..100).map(|i| format!("model.decoder.layers.{i}.self_attn.v_proj")));
        let others: Vec<String> = (0..100)
            .map(|i| format!("model.encoder.layers.{i}.self_attn.k_proj"))
            .collect();
        assert_eq!(
            minimal_target_modules(&targets, &others),
            ["q_proj", "v_proj"]
        );
        // A leaf name shared with a module that is not targeted needs a longer suffix.
        let targets = vec!["a.q".to_string(), "b.q".to_string()];
        let others = vec!["c.q".to_string()];
        assert_eq!(minimal_target_modules(&targets, &others), ["a.q", "b.q"]);
    }

    #[test]
    fn pattern_lookup_takes_first_match_on_dot_boundary() {
        let p = vec![("lin1".to_string(), 4usize), ("lin.".to_string(), 2)];
        assert_eq!(
            pattern_value("rank_pattern", &p, "a.lin1").unwrap(),
            Some(4)
        );
        assert_eq!(pattern_value("rank_pattern", &p, "lin0").unwrap(), Some(2));
        assert_eq!(pattern_value("rank_pattern", &p, "xlin1").unwrap(), None);
    }

    #[test]
    fn unsupported_regex_is_a_config_error() {
        let sel = ModuleSelector::Regex("(?<=a)b".into());
        let s = Selection {
            target_modules: Some(&sel),
            exclude_modules: None,
            modules_to_save: None,
            layers_to_transform: None,
            layers_pattern: None,
        };
        assert!(
            matches!(s.is_target("ab"), Err(PeftError::InvalidConfig { field, .. }) if field == "target_modules")
        );
    }
}
