namespace LoraKit.Tokenization;

/// <summary>
/// One turn of a conversation as a chat template sees it: a role ("system", "user", "assistant", "tool") and its text.
/// Named ChatTurn, not ChatMessage, so it never collides with Microsoft.Extensions.AI's <c>ChatMessage</c> in a program
/// that uses both (messages with tool calls or other fields go to <see cref="ChatTemplate"/> as JSON instead).
/// </summary>
/// <param name="Role">the speaker: system, user, assistant or tool</param>
/// <param name="Content">the turn's text</param>
public sealed record ChatTurn(string Role, string Content);
