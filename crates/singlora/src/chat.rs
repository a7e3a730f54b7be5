//! Chat templates: a Hugging Face chat model's prompt format (the Jinja `chat_template` of
//! tokenizer_config.json or of a GGUF file's metadata), rendered with minijinja. SFT training
//! wraps each prompt as one user turn with the assistant's turn opened
//! (`add_generation_prompt`), and `predict` does the same, so a model is trained on and asked
//! in the format it was tuned for. The rendered text carries its own special tokens, so it is
//! tokenized without the tokenizer's added ones (as `apply_chat_template` then `encode(...,
//! add_special_tokens=False)` does in transformers).

use minijinja::{context, Environment, Error as JinjaError, ErrorKind};

use crate::error::{Error, Result};

/// A compiled chat template with the special-token strings it may use.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos: String,
    eos: String,
}

fn raise_exception(msg: String) -> std::result::Result<String, JinjaError> {
    Err(JinjaError::new(ErrorKind::InvalidOperation, msg))
}

impl ChatTemplate {
    /// Compiles `source`; `bos`/`eos` are the token strings templates refer to as
    /// `bos_token`/`eos_token` (empty when the tokenizer has none).
    pub fn new(source: &str, bos: Option<String>, eos: Option<String>) -> Result<Self> {
        let mut env = Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| Error::msg(format!("chat_template: cannot compile it: {e}")))?;
        Ok(Self {
            env,
            bos: bos.unwrap_or_default(),
            eos: eos.unwrap_or_default(),
        })
    }

    /// Compiles `source` with the bos/eos token strings of `tokenizer` (ids in `special`).
    pub fn for_tokenizer(
        source: &str,
        tokenizer: &tokenizers::Tokenizer,
        special: &crate::tokenize::SpecialTokens,
    ) -> Result<Self> {
        let name = |id: Option<u32>| id.and_then(|i| tokenizer.id_to_token(i));
        Self::new(source, name(special.bos), name(special.eos))
    }

    /// The prompt as one user turn, with the assistant's turn opened.
    pub fn user_prompt(&self, prompt: &str) -> Result<String> {
        self.prompt_with_system(None, prompt)
    }

    /// [`ChatTemplate::user_prompt`] after a system turn, where one is given.
    pub fn prompt_with_system(&self, system: Option<&str>, prompt: &str) -> Result<String> {
        let mut turns = vec![];
        if let Some(system) = system {
            turns.push(("system", system));
        }
        turns.push(("user", prompt));
        self.render(&turns, true)
    }

    /// A conversation of (role, content) turns; `add_generation_prompt` opens the
    /// assistant's next turn.
    pub fn render(&self, turns: &[(&str, &str)], add_generation_prompt: bool) -> Result<String> {
        let t = self
            .env
            .get_template("chat")
            .map_err(|e| Error::msg(format!("chat_template: {e}")))?;
        let messages: Vec<_> = turns
            .iter()
            .map(|(role, content)| context! { role => role, content => content })
            .collect();
        t.render(context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos.as_str(),
            eos_token => self.eos.as_str(),
        })
        .map_err(|e| Error::msg(format!("chat_template: cannot render a conversation: {e}")))
    }

    /// The conversation's text and the byte ranges of its assistant turns (each from the end
    /// of the prompt that opens it to the end of the turn the template closes): the text a
    /// model learns to write. Refused where rendering a conversation does not extend the
    /// rendering of its beginning, since the spans could not be found then.
    pub fn assistant_spans(
        &self,
        turns: &[(&str, &str)],
    ) -> Result<(String, Vec<std::ops::Range<usize>>)> {
        let full = self.render(turns, false)?;
        let mut spans = vec![];
        for (i, (role, _)) in turns.iter().enumerate() {
            if *role != "assistant" {
                continue;
            }
            let opened = self.render(&turns[..i], true)?;
            let closed = self.render(&turns[..=i], false)?;
            if !closed.starts_with(&opened) || !full.starts_with(&closed) {
                return Err(Error::msg(format!(
                    "chat_template: the conversation up to turn {i} does not render as the \
                     start of the whole conversation, so the assistant's text cannot be told \
                     apart from the rest"
                )));
            }
            spans.push(opened.len()..closed.len());
        }
        Ok((full, spans))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SmolLM2-Instruct's template (from its tokenizer_config.json), shortened system text.
    const SMOL: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are helpful.<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

    #[test]
    fn renders_a_user_turn_with_the_assistant_opened() {
        let t = ChatTemplate::new(SMOL, None, Some("<|im_end|>".into())).unwrap();
        assert_eq!(
            t.user_prompt("Is it good?").unwrap(),
            "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nIs it good?<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn assistant_spans_cover_the_answers_and_their_end_of_turn() {
        let t = ChatTemplate::new(SMOL, None, Some("<|im_end|>".into())).unwrap();
        let turns = [
            ("user", "Hi"),
            ("assistant", "Hello."),
            ("user", "Bye"),
            ("assistant", "Bye!"),
        ];
        let (text, spans) = t.assistant_spans(&turns).unwrap();
        let got: Vec<&str> = spans.iter().map(|s| &text[s.clone()]).collect();
        assert_eq!(got, ["Hello.<|im_end|>\n", "Bye!<|im_end|>\n"]);
        assert!(text.starts_with("<|im_start|>system\nYou are helpful."));
    }

    #[test]
    fn a_system_turn_replaces_the_default_one() {
        let t = ChatTemplate::new(SMOL, None, Some("<|im_end|>".into())).unwrap();
        assert_eq!(
            t.prompt_with_system(Some("Be brief."), "Is it good?").unwrap(),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nIs it good?<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn templates_see_bos_and_python_methods() {
        // LLaMA-2 style: bos_token, .strip(), raise_exception in an untaken branch
        let src = "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'].strip() }} [/INST]{% else %}{{ raise_exception('only user turns') }}{% endif %}{% endfor %}";
        let t = ChatTemplate::new(src, Some("<s>".into()), None).unwrap();
        assert_eq!(t.user_prompt("  hi  ").unwrap(), "<s>[INST] hi [/INST]");
    }

    #[test]
    fn a_broken_template_is_named() {
        let err = ChatTemplate::new("{% for %}", None, None)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("chat_template"), "{err}");
        let t = ChatTemplate::new("{{ raise_exception('no') }}", None, None).unwrap();
        let err = t.user_prompt("x").unwrap_err().to_string();
        assert!(err.contains("chat_template") && err.contains("no"), "{err}");
    }
}
