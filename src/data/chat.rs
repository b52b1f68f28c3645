//! Chat data through the tokenizer's own chat template (Jinja, rendered with `minijinja` under
//! the settings transformers' `apply_chat_template` uses), and where each assistant turn lies in
//! the rendered text, so the loss counts the model's answers only.

use super::DataError;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// One turn of a conversation.
#[derive(Clone, Debug, PartialEq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// A model's chat template with the special-token strings templates refer to.
#[derive(Debug)]
pub struct ChatTemplate {
    env: minijinja::Environment<'static>,
    bos_token: String,
    eos_token: String,
    /// The file the template came from (for errors).
    pub origin: PathBuf,
}

const NAME: &str = "chat_template";

impl ChatTemplate {
    /// Compiles `source` as transformers does: `trim_blocks` and `lstrip_blocks` on, loop
    /// controls, `raise_exception`, and Python's string methods (`.strip()`, `.startswith()`).
    pub fn new(
        source: String,
        bos_token: String,
        eos_token: String,
        origin: &Path,
    ) -> Result<Self, DataError> {
        let mut env = minijinja::Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| DataError::format(origin, format!("chat template: {e}")))?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<String, _> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                msg,
            ))
        });
        env.add_template_owned(NAME, source).map_err(|e| {
            DataError::format(origin, format!("chat template does not parse ({e})"))
        })?;
        Ok(Self {
            env,
            bos_token,
            eos_token,
            origin: origin.into(),
        })
    }

    /// The template of a Hugging Face folder: `chat_template.jinja` (transformers 5 writes it
    /// there), else `tokenizer_config.json`'s `chat_template` (a string, or a list of named
    /// templates of which `default` is taken). `None` when the folder has neither.
    pub fn from_hf_dir(dir: &Path) -> Result<Option<Self>, DataError> {
        let config_path = dir.join("tokenizer_config.json");
        let config: serde_json::Value = match std::fs::read(&config_path) {
            Ok(b) => serde_json::from_slice(&b)
                .map_err(|e| DataError::format(&config_path, format!("not valid JSON ({e})")))?,
            Err(_) => serde_json::Value::Null,
        };
        let token = |key: &str| match &config[key] {
            serde_json::Value::String(s) => s.clone(),
            v => v["content"].as_str().unwrap_or("").to_string(),
        };
        let (bos, eos) = (token("bos_token"), token("eos_token"));
        let jinja = dir.join("chat_template.jinja");
        if jinja.is_file() {
            let source = super::read_lossy(&jinja)?;
            return Self::new(source, bos, eos, &jinja).map(Some);
        }
        let source = match &config[NAME] {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Array(named) => named
                .iter()
                .find(|t| t["name"] == "default")
                .or(named.first())
                .and_then(|t| t["template"].as_str())
                .map(String::from),
            _ => None,
        };
        source
            .map(|s| Self::new(s, bos, eos, &config_path))
            .transpose()
    }

    /// The conversation as the template writes it; with `add_generation_prompt`, followed by
    /// the opening of an assistant turn.
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String, String> {
        let t = self.env.get_template(NAME).map_err(|e| e.to_string())?;
        let messages: Vec<minijinja::Value> = messages
            .iter()
            .map(|m| minijinja::context! { role => m.role.as_str(), content => m.content.as_str() })
            .collect();
        t.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        })
        .map_err(|e| e.to_string())
    }

    /// The rendered conversation and the byte range of each assistant turn in it. A turn's
    /// range runs from the end of the conversation before it rendered with the generation prompt
    /// (so the `<|im_start|>assistant\n` header is not in it) to the end of the conversation up
    /// to and including it (so its end-of-turn token is): the prefix renderings TRL and others
    /// use. A template whose shorter renderings are not prefixes of the whole (one that moves a
    /// system prompt, say) cannot be split this way and is an error.
    pub fn render_with_spans(
        &self,
        messages: &[Message],
    ) -> Result<(String, Vec<Range<usize>>), String> {
        let full = self.render(messages, false)?;
        let mut spans = Vec::new();
        for (i, m) in messages.iter().enumerate() {
            if m.role != "assistant" {
                continue;
            }
            let before = self.render(&messages[..i], true)?;
            let through = self.render(&messages[..=i], false)?;
            if !(through.starts_with(&before) && full.starts_with(&through)) {
                return Err(format!(
                    "the chat template does not render this conversation prefix by prefix \
                     (turn {}), so its assistant tokens cannot be found",
                    i + 1
                ));
            }
            if before.len() < through.len() {
                spans.push(before.len()..through.len());
            }
        }
        Ok((full, spans))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SmolLM2-Instruct's template (from its tokenizer_config.json).
    pub(crate) const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    fn msg(role: &str, content: &str) -> Message {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }

    #[test]
    fn smollm2_template_renders_and_finds_assistant_turns() {
        let t = ChatTemplate::new(SMOLLM2.into(), "".into(), "".into(), Path::new("t")).unwrap();
        let conv = [
            msg("user", "Hi"),
            msg("assistant", "Hello!"),
            msg("user", "Bye"),
            msg("assistant", "See you."),
        ];
        let (text, spans) = t.render_with_spans(&conv).unwrap();
        assert_eq!(
            text,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging \
             Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!\
             <|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\nSee you.\
             <|im_end|>\n"
        );
        let parts: Vec<&str> = spans.iter().map(|r| &text[r.clone()]).collect();
        assert_eq!(parts, ["Hello!<|im_end|>\n", "See you.<|im_end|>\n"]);
    }

    /// transformers' settings: blocks eat their newline and leading indentation; Python string
    /// methods work; raise_exception is an error; bos/eos tokens reach the template.
    #[test]
    fn transformers_template_settings() {
        let src = "{{ bos_token }}\n{% for m in messages %}\n    {% if m.role == 'system' %}{{ raise_exception('no system') }}{% endif %}\n[{{ m.role }}] {{ m.content.strip() }}{{ eos_token if m.role == 'assistant' }}\n{% endfor %}\n";
        let t = ChatTemplate::new(src.into(), "<s>".into(), "</s>".into(), Path::new("t")).unwrap();
        let out = t
            .render(&[msg("user", "  hi "), msg("assistant", "yo")], false)
            .unwrap();
        assert_eq!(out, "<s>\n[user] hi\n[assistant] yo</s>\n");
        let e = t.render(&[msg("system", "x")], false).unwrap_err();
        assert!(e.contains("no system"), "{e}");
        // A template that puts the last message first is not prefix-stable: an error.
        let odd = "{% for m in messages|reverse %}{{ m.content }};{% endfor %}";
        let t = ChatTemplate::new(odd.into(), "".into(), "".into(), Path::new("t")).unwrap();
        let e = t
            .render_with_spans(&[msg("user", "a"), msg("assistant", "b")])
            .unwrap_err();
        assert!(e.contains("prefix by prefix"), "{e}");
    }

    #[test]
    fn template_from_a_folder() {
        let dir = tempfile::tempdir().unwrap();
        assert!(ChatTemplate::from_hf_dir(dir.path()).unwrap().is_none());
        let cfg = serde_json::json!({
            "bos_token": {"content": "<s>"}, "eos_token": "</s>",
            "chat_template": [{"name": "tool_use", "template": "T"},
                              {"name": "default", "template": "{{ bos_token }}D{{ eos_token }}"}]
        });
        std::fs::write(dir.path().join("tokenizer_config.json"), cfg.to_string()).unwrap();
        let t = ChatTemplate::from_hf_dir(dir.path()).unwrap().unwrap();
        assert_eq!(t.render(&[], false).unwrap(), "<s>D</s>");
        // chat_template.jinja wins over the config's key.
        std::fs::write(dir.path().join("chat_template.jinja"), "J{{ eos_token }}").unwrap();
        let t = ChatTemplate::from_hf_dir(dir.path()).unwrap().unwrap();
        assert_eq!(t.render(&[], false).unwrap(), "J</s>");
        std::fs::write(dir.path().join("chat_template.jinja"), "{% for %}").unwrap();
        let e = ChatTemplate::from_hf_dir(dir.path())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("chat_template.jinja: chat template does not parse"),
            "{e}"
        );
    }
}
