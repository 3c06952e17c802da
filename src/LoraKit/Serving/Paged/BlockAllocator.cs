namespace LoraKit.Serving.Paged;

/// <summary>
/// The free list of a paged KV cache's blocks (vLLM's block manager without prefix sharing): blocks are handed out
/// one at a time as sequences grow and returned when they finish, are cancelled or are preempted. A block belongs to at
/// most one sequence, so no sequence can read another's keys. Engine thread only.
/// </summary>
public sealed class BlockAllocator
{
    readonly Stack<int> _free;
    readonly bool[] _used;

    public BlockAllocator(int blocks)
    {
        if (blocks < 1) throw new ArgumentOutOfRangeException(nameof(blocks), "a KV cache needs at least one block");
        _used = new bool[blocks];
        // Lowest ids first: a lightly loaded engine keeps touching the same few blocks.
        _free = new Stack<int>(Enumerable.Range(0, blocks).Reverse());
    }

    public int Total => _used.Length;
    public int Free => _free.Count;
    public int Used => Total - Free;

    /// <summary>A free block, or -1 when none is left (the scheduler then preempts or waits).</summary>
    public int TryAllocate()
    {
        if (_free.Count == 0) return -1;
        int b = _free.Pop();
        _used[b] = true;
        return b;
    }

    /// <summary>Returns a sequence's blocks; a block freed twice is a scheduler defect and throws.</summary>
    public void Release(IEnumerable<int> blocks)
    {
        foreach (int b in blocks)
        {
            if (!_used[b]) throw new InvalidOperationException($"KV block {b} freed twice");
            _used[b] = false;
            _free.Push(b);
        }
    }
}
