"""Structure in a chat model's output text: reasoning (``reasoning``), tool calls
(``tool_calls``), the two together per request (``chat_output``), and the grammar that makes a
model call a tool (``tool_grammar``)."""
